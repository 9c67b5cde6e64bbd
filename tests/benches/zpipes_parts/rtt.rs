//! Round trips: `write_chunk(16 B)` + `read_chunk(16)` through the broker,
//! beside a raw DEALER→ROUTER echo and a raw PING→PING_OK, in alternating
//! blocks.

use super::*;

/// Total time of each kind of round trip over all timed rounds.
pub(crate) struct RoundTrips {
    pub zpipes_write: Duration,
    pub zpipes_read: Duration,
    pub raw: Duration,
    pub ping: Duration,
}

/// Untimed rounds of each kind first, so connections and allocations are
/// warm; then the kinds alternate block by block.
pub(crate) fn round_trips(opts: &Options, echo_endpoint: &str, rounds: u64) -> anyhow::Result<RoundTrips> {
    phase("round-trip setup");
    const PIPE: &str = "bench-rtt";
    // The reader reads ahead: its next READ is at the broker before the
    // writer writes, as a program reading a stream of messages would have
    // it (Options::read_ahead).
    let reader_opts = Options { read_ahead: true, ..opts.clone() };
    let mut reader = Reader::open(PIPE, &reader_opts)?;
    let mut writer = Writer::open(PIPE, opts)?;

    let warm = (rounds / 10).clamp(100, 10_000);
    let router_context = zmq::Context::new();
    let router = router_context.socket(zmq::ROUTER)?;
    router.bind(echo_endpoint)?;
    let echo =
        thread::Builder::new().name("raw-echo".into()).spawn(move || raw_echo(router, warm + rounds))?;
    let context = zmq::Context::new();
    let dealer = context.socket(zmq::DEALER)?;
    dealer.connect(echo_endpoint)?;
    // A raw DEALER speaking ZPIPES PING to the broker itself.
    let pinger = context.socket(zmq::DEALER)?;
    pinger.connect(&opts.endpoint)?;

    let mut seq = 0;
    let mut totals = RoundTrips {
        zpipes_write: Duration::ZERO,
        zpipes_read: Duration::ZERO,
        raw: Duration::ZERO,
        ping: Duration::ZERO,
    };
    let blocks = RTT_BLOCKS.min(rounds);
    for block in 0..=blocks {
        // Block 0 is the warm-up, and is not counted.
        let n = match block {
            0 => warm,
            b => rounds / blocks + u64::from(b - 1 < rounds % blocks),
        };
        phase("zpipes round trips");
        let (write, read) = zpipes_rounds(&mut writer, &mut reader, n, &mut seq)?;
        phase("raw round trips");
        let raw = raw_rounds(&dealer, n, &mut seq)?;
        phase("broker PING round trips");
        let ping = ping_rounds(&pinger, n)?;
        if block > 0 {
            totals.zpipes_write += write;
            totals.zpipes_read += read;
            totals.raw += raw;
            totals.ping += ping;
        }
    }
    join(echo, "raw echo")?;
    writer.close()?;
    reader.close()?;
    Ok(totals)
}

/// `n` rounds of write(16 B) then read(16); the time in each half.
fn zpipes_rounds(
    writer: &mut Writer,
    reader: &mut Reader,
    n: u64,
    seq: &mut u64,
) -> anyhow::Result<(Duration, Duration)> {
    let (mut write, mut read) = (Duration::ZERO, Duration::ZERO);
    let mut data = [0x5au8; SMALL];
    for _ in 0..n {
        *seq += 1;
        data[..8].copy_from_slice(&seq.to_le_bytes());
        let t0 = Instant::now();
        match writer.write_chunk(&data, None)? {
            WriteOutcome::Written => {}
            WriteOutcome::Timeout => bail!("write {seq} timed out with no timeout set"),
        }
        let t1 = Instant::now();
        match reader.read_chunk(SMALL, None)? {
            ReadOutcome::Data(got) if got[..] == data[..] => {}
            other => bail!("read {seq}: expected the 16 bytes written, got {other:?}"),
        }
        let t2 = Instant::now();
        write += t1 - t0;
        read += t2 - t1;
    }
    Ok((write, read))
}

/// `n` DEALER → ROUTER echo → DEALER round trips of 16 bytes.
fn raw_rounds(dealer: &zmq::Socket, n: u64, seq: &mut u64) -> anyhow::Result<Duration> {
    let mut data = [0x5au8; SMALL];
    let mut reply = zmq::Message::new();
    let start = Instant::now();
    for _ in 0..n {
        *seq += 1;
        data[..8].copy_from_slice(&seq.to_le_bytes());
        dealer.send(&data[..], 0)?;
        dealer.recv(&mut reply, 0)?;
        ensure!(reply[..] == data[..], "echo {seq} came back changed");
    }
    Ok(start.elapsed())
}

/// `n` PING → PING_OK round trips through the broker.
fn ping_rounds(pinger: &zmq::Socket, n: u64) -> anyhow::Result<Duration> {
    let ping = ZpipesMsg::Ping {}.encode();
    let pong = ZpipesMsg::PingOk {}.encode();
    let mut reply = zmq::Message::new();
    let start = Instant::now();
    for _ in 0..n {
        pinger.send(&ping[..], 0)?;
        pinger.recv(&mut reply, 0)?;
        ensure!(reply[..] == pong[..], "PING got {:?}", &reply[..]);
    }
    Ok(start.elapsed())
}

/// Sends each of `count` messages straight back to its sender.
fn raw_echo(router: zmq::Socket, count: u64) -> anyhow::Result<()> {
    let mut routing_id = zmq::Message::new();
    for _ in 0..count {
        router.recv(&mut routing_id, 0)?;
        ensure!(router.get_rcvmore()?, "a ROUTER message without a body");
        let body = router.recv_msg(0)?;
        router.send(&routing_id[..], zmq::SNDMORE)?;
        router.send(body, 0)?;
    }
    Ok(())
}

// ---- helpers ----

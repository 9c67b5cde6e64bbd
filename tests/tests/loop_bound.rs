//! One hostile client must not stall the broker's loop: ICANHAZ frames of
//! 12,000,000 empty cache entries (60 MB each) and a legitimate cache of a
//! million files, from one connection, while a pipe streams. The stream
//! completes, a concurrent pipe round trip stays under a second, and the
//! broker's peak memory stays under 256 MB.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zbroker_client::zpipes::{Options, Reader, Writer};
use zbroker_proto::codec::ShortStr;
use zbroker_proto::filemq::FilemqMsg;
use zbroker_tests::bomb::{bomb, million_files};
use zbroker_tests::{pseudo_random, Broker};

fn recv(socket: &zmq::Socket, ms: i64) -> Option<FilemqMsg> {
    (socket.poll(zmq::POLLIN, ms).ok()? > 0).then(|| FilemqMsg::decode(socket.recv_bytes(0).ok()?).ok())?
}

#[test]
fn an_icanhaz_bomb_from_one_client_does_not_stall_the_loop() {
    let published = tempfile::tempdir().unwrap();
    let broker = Broker::start(&["--publish", published.path().to_str().unwrap()]);
    broker.wait_scanned();
    let opts = Options::endpoint(&broker.endpoint());

    // The stream: 32 MiB through a pipe, start to end.
    let data = pseudo_random(32 << 20, 3);
    let (sent, writer_opts, reader_opts) = (data.clone(), opts.clone(), opts.clone());
    let writer = std::thread::spawn(move || {
        let mut writer = Writer::open("stream", &writer_opts).expect("open the writer");
        writer.write_all(&sent).expect("write");
        writer.close().expect("close");
    });
    let reader = std::thread::spawn(move || {
        let mut reader = Reader::open("stream", &reader_opts).expect("open the reader");
        let mut got = Vec::new();
        reader.read_to_end(&mut got).expect("read");
        got
    });

    // The probe: a round trip through another pipe, again and again.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (stop, opts) = (stop.clone(), opts.clone());
        std::thread::spawn(move || {
            let mut writer = Writer::open("probe", &opts).expect("open the probe writer");
            let mut reader = Reader::open("probe", &opts).expect("open the probe reader");
            let (mut worst, mut trips) = (Duration::ZERO, 0);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                writer.write_all(b"ping").and_then(|()| writer.flush()).expect("probe write");
                let mut back = [0u8; 4];
                reader.read_exact(&mut back).expect("probe read");
                worst = worst.max(started.elapsed());
                trips += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (worst, trips)
        })
    };

    // The bomb, from one connection: three 60 MB frames of empty entries,
    // then a legitimate cache of a million files.
    let before = broker.status();
    let context = zmq::Context::new();
    let client = context.socket(zmq::DEALER).unwrap();
    client.set_linger(0).unwrap();
    client.connect(&broker.filemq_endpoint()).unwrap();
    client.send(FilemqMsg::Ohai { protocol: ShortStr::lossy("FILEMQ"), version: 2 }.encode(), 0).unwrap();
    assert_eq!(recv(&client, 5000), Some(FilemqMsg::OhaiOk {}));
    let frame = bomb();
    for _ in 0..3 {
        client.send(&frame[..], 0).unwrap();
    }
    drop(frame);
    let legit = million_files("/bomb");
    eprintln!("a million-file cache: {} bytes", legit.len());
    client.send(legit, 0).unwrap();
    client.send(FilemqMsg::Hugz {}.encode(), 0).unwrap();
    // The legitimate cache is taken (ICANHAZ-OK), and the HUGZ that waited
    // behind it is answered after it.
    assert_eq!(recv(&client, 60_000), Some(FilemqMsg::IcanhazOk {}));
    assert_eq!(recv(&client, 10_000), Some(FilemqMsg::HugzOk {}));
    // Gone: the million names it held are freed too, and not on the loop.
    drop(client);
    assert!(
        zbroker_tests::wait_until(Duration::from_secs(10), || {
            broker.status()["services"]["filemq"]["connections"] == 0
        }),
        "the bomber is forgotten"
    );

    writer.join().expect("the writer finished");
    let got = reader.join().expect("the reader finished");
    assert!(got == data, "the stream arrived whole");
    stop.store(true, Ordering::Relaxed);
    let (worst, trips) = probe.join().expect("the probe finished");

    let after = broker.status();
    let peak = broker.peak_rss();
    eprintln!(
        "round trips: {trips}, worst {worst:?}; longest loop pass {} ms before the bomb, {} ms after ({}); \
         peak RSS {} MiB",
        before["longest_pass_ms"],
        after["longest_pass_ms"],
        after["longest_pass_cause"],
        peak >> 20
    );
    assert_eq!(after["services"]["filemq"]["malformed_frames"], 3, "the three bombs refused");
    assert!(trips > 0);
    assert!(worst < Duration::from_secs(1), "a pipe round trip took {worst:?} under the bomb");
    let longest = after["longest_pass_ms"].as_f64().expect("the status shows the longest pass");
    assert!(longest < 1000.0, "a loop pass took {longest} ms: {}", after["longest_pass_cause"]);
    assert!(peak <= 256 << 20, "peak RSS {} MiB", peak >> 20);
}

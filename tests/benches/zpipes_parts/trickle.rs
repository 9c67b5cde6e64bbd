//! Trickle latency: lines written one at a time with pauses, as
//! `(while :; do date; sleep 0.05; done) | zpipes write` does, read the way
//! `zpipes read` reads (`read_some`, one READ kept in flight); each line's
//! delay from `write_all` + `send_gathered` to its arrival.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zbroker_client::zpipes::{Options, ReadOutcome, Reader, Writer};

pub struct Trickle {
    pub median: Duration,
    pub worst: Duration,
    pub partial: bool,
}

pub fn trickle(opts: &Options, lines: usize, interval: Duration) -> anyhow::Result<Trickle> {
    const PIPE: &str = "bench-trickle";
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let reader_opts = opts.clone();
    let reader = std::thread::spawn(move || -> anyhow::Result<(Vec<Instant>, bool)> {
        let mut reader = Reader::open(PIPE, &reader_opts)?;
        let partial = reader.partial_reads();
        let mut arrived = Vec::new();
        while arrived.len() < lines {
            match reader.read_some(1 << 20, Some(Duration::from_millis(200)))? {
                ReadOutcome::Data(data) => {
                    let now = Instant::now();
                    arrived.extend(data.iter().filter(|&&b| b == b'\n').map(|_| now));
                }
                ReadOutcome::Timeout => {}
                ReadOutcome::End => anyhow::bail!("the trickle ended early"),
            }
        }
        reader.close()?;
        Ok((arrived, partial))
    });
    let mut writer = Writer::open(PIPE, opts)?;
    writer.wait_for_reader(None)?;
    for i in 0..lines {
        std::thread::sleep(interval);
        sent.lock().unwrap().push(Instant::now());
        writer.write_all(format!("line {i}\n").as_bytes())?;
        writer.send_gathered()?;
    }
    let (arrived, partial) = reader.join().map_err(|_| anyhow::anyhow!("the trickle reader panicked"))??;
    writer.close()?;
    let sent = sent.lock().unwrap();
    let mut delays: Vec<Duration> = arrived.iter().zip(sent.iter()).map(|(a, s)| *a - *s).collect();
    delays.sort();
    Ok(Trickle { median: delays[delays.len() / 2], worst: delays[delays.len() - 1], partial })
}

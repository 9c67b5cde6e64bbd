//! The host's side of the memory budget (`--memory-limit`): its default
//! size, and replies handed to libzmq that stay counted until libzmq frees
//! them.

use std::os::raw::c_void;
use zbroker_services::budget::Budget;

/// The default budget: the lesser of 1 GiB and a quarter of the machine's
/// memory (the cgroup's `memory.max` when one is set, else `MemTotal`).
pub fn default_limit() -> usize {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let memory = read("/sys/fs/cgroup/memory.max")
        .and_then(|text| cgroup_max(&text))
        .or_else(|| read("/proc/meminfo").and_then(|text| mem_total(&text)));
    let gib = 1usize << 30;
    // Never under the smallest limit the flag accepts (a tiny cgroup).
    memory.map_or(gib, |bytes| (bytes / 4).clamp(MIN_LIMIT as u64, gib as u64) as usize)
}

/// The smallest `--memory-limit` accepted.
pub const MIN_LIMIT: usize = 1 << 20;

/// A cgroup v2 `memory.max`: bytes, or `max` for no limit.
fn cgroup_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn mem_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What libzmq's free callback needs: whose count, and how much.
struct Held {
    budget: Budget,
    len: usize,
}

/// libzmq calls this (on one of its I/O threads) once it is done with a
/// message's bytes.
unsafe extern "C" fn release(data: *mut c_void, hint: *mut c_void) {
    // SAFETY: `hint` and `data` are the boxes `send_counted` leaked for
    // this message, and libzmq calls this once per message.
    unsafe {
        let held = Box::from_raw(hint.cast::<Held>());
        drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(data.cast::<u8>(), held.len)));
        held.budget.give(held.len);
    }
}

/// Sends `frame` without copying it. Its bytes, already counted in
/// `budget` by the caller, are given back when libzmq frees them (after
/// they went out on the wire, or with a peer that went), or at once if the
/// send fails.
pub fn send_counted(
    socket: &mut zmq::Socket,
    frame: Vec<u8>,
    budget: &Budget,
    flags: i32,
) -> zmq::Result<()> {
    let len = frame.len();
    let data = Box::into_raw(frame.into_boxed_slice()).cast::<u8>().cast::<c_void>();
    let hint = Box::into_raw(Box::new(Held { budget: budget.clone(), len })).cast::<c_void>();
    let mut msg = std::mem::MaybeUninit::<zmq_sys::zmq_msg_t>::uninit();
    // SAFETY: `msg` is initialised by zmq_msg_init_data before any other
    // use; on success libzmq owns `data` and `hint` and calls `release`
    // once; on failure of the send the message is closed, which calls it.
    unsafe {
        if zmq_sys::zmq_msg_init_data(msg.as_mut_ptr(), data, len, Some(release), hint) != 0 {
            let error = zmq::Error::from_raw(zmq_sys::zmq_errno());
            release(data, hint);
            return Err(error);
        }
        if zmq_sys::zmq_msg_send(msg.as_mut_ptr(), socket.as_mut_ptr(), flags) < 0 {
            let error = zmq::Error::from_raw(zmq_sys::zmq_errno());
            zmq_sys::zmq_msg_close(msg.as_mut_ptr());
            return Err(error);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_memory_is_read_from_cgroup_or_meminfo() {
        assert_eq!(cgroup_max("max\n"), None);
        assert_eq!(cgroup_max("2147483648\n"), Some(2 << 30));
        assert_eq!(mem_total("MemTotal:       16318748 kB\nMemFree: 1 kB\n"), Some(16318748 * 1024));
        let limit = default_limit();
        assert!(limit > 0 && limit <= 1 << 30);
    }

    #[test]
    fn a_sent_frame_is_counted_until_libzmq_frees_it() {
        let context = zmq::Context::new();
        let mut push = context.socket(zmq::PUSH).unwrap();
        let pull = context.socket(zmq::PULL).unwrap();
        pull.bind("inproc://counted").unwrap();
        push.connect("inproc://counted").unwrap();
        let budget = Budget::new(1 << 20);
        budget.take(1000);
        send_counted(&mut push, vec![7; 1000], &budget, 0).unwrap();
        let got = pull.recv_bytes(0).unwrap();
        assert_eq!(got, vec![7; 1000]);
        // The receiver's copy of an inproc message is the same buffer:
        // freed once `got`'s message closed.
        for _ in 0..100 {
            if budget.used() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(budget.used(), 0);
    }
}

//! Replacing a file so that a crash at any moment leaves the old file or
//! the new one, whole: the one way the services write their state (the
//! run-time mounts, the broker's digest caches).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes a temporary file beside `path` with `write`, syncs it, renames it
/// over `path` and syncs the directory so the rename itself lasts. The
/// temporary name is unique to this process and call (two writers of one
/// directory, such as scans of two mounts sharing a cache directory, never
/// meet); on any failure it is removed and `path` is untouched.
pub fn replace_file(path: &Path, write: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> io::Result<()> {
    static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::other("the path names no file"))?;
    let mut temp_name = OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.{}.tmp", std::process::id(), NEXT_TEMP.fetch_add(1, Ordering::Relaxed)));
    let temp = dir.join(temp_name);
    let written = (|| {
        let mut out = BufWriter::new(File::create(&temp)?);
        write(&mut out)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        // Best effort: the temporary name is ours alone.
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        replace_file(&path, |out| out.write_all(b"one\n")).unwrap();
        replace_file(&path, |out| out.write_all(b"two\n")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two\n");
        // A writer that fails leaves the old file and no temporary one.
        let e = replace_file(&path, |out| {
            out.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
        assert_eq!(std::fs::read(&path).unwrap(), b"two\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![OsString::from("state")]);
        // A missing directory is an error, not a panic.
        assert!(replace_file(&dir.path().join("missing/state"), |_| Ok(())).is_err());
    }
}

//! Directory handles: every inbox operation names one plain component
//! relative to a directory we hold open, and never follows a symlink
//! (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`). A symlink planted anywhere, even
//! after we looked, makes the operation fail instead of leading it out of
//! the inbox.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// An open directory.
#[derive(Debug)]
pub(crate) struct Dir {
    fd: OwnedFd,
}

/// One path component as the C calls take it; refuses `/`, NUL, `.`, `..`
/// and the empty name, which would not be one component.
fn component(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a file name")));
    }
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a file name"))
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Retries a call interrupted by a signal.
fn retry(mut call: impl FnMut() -> libc::c_int) -> io::Result<libc::c_int> {
    loop {
        match check(call()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// True if `e` says a symlink stood where a file or directory was wanted
/// (`ELOOP` from `O_NOFOLLOW`).
pub(crate) fn is_symlink_error(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

impl Dir {
    /// Opens the directory at `path` (the inbox root the user named: a
    /// symlink there is the user's choice and is followed).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let path = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
        // SAFETY: a valid C string; the descriptor returned is ours.
        let fd = retry(|| unsafe {
            libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC)
        })?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(Dir { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Opens subdirectory `name`; a symlink there fails (`ELOOP`), and so
    /// does a file (`ENOTDIR`).
    pub fn open_dir(&self, name: &str) -> io::Result<Dir> {
        let name = component(name)?;
        // SAFETY: a valid C string and a directory descriptor we hold.
        let opened = retry(|| unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        });
        let fd = match opened {
            // Linux says ENOTDIR for a symlink opened this way: tell the
            // two apart, a symlink is the one that matters.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                let name = name.to_str().unwrap_or_default();
                return Err(match self.entry(name) {
                    Ok(Some(entry)) if entry.kind == Kind::Symlink => {
                        io::Error::from_raw_os_error(libc::ELOOP)
                    }
                    _ => e,
                });
            }
            other => other?,
        };
        // SAFETY: as in `open`.
        Ok(Dir { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Creates subdirectory `name` with `mode`; false if something already
    /// has that name.
    pub fn make_dir(&self, name: &str, mode: u32) -> io::Result<bool> {
        let name = component(name)?;
        // SAFETY: a valid C string and a directory descriptor we hold.
        match retry(|| unsafe { libc::mkdirat(self.fd.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) }) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Opens file `name` with `flags` (plus `O_NOFOLLOW | O_CLOEXEC`);
    /// `mode` applies when it is created.
    pub fn open_file(&self, name: &str, flags: libc::c_int, mode: u32) -> io::Result<File> {
        let name = component(name)?;
        // SAFETY: a valid C string and a directory descriptor we hold.
        let fd = retry(|| unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        })?;
        // SAFETY: as in `open`.
        let file = unsafe { File::from_raw_fd(fd) };
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!("{} is not a regular file", name.to_string_lossy())));
        }
        Ok(file)
    }

    /// A new file `name`, which must not exist (`O_EXCL`): nothing planted
    /// there in advance can be written through.
    pub fn create_new(&self, name: &str, mode: u32) -> io::Result<File> {
        self.open_file(name, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, mode)
    }

    /// `lstat` of entry `name`; `None` if there is none.
    pub fn entry(&self, name: &str) -> io::Result<Option<Entry>> {
        let name = component(name)?;
        // SAFETY: zeroed `stat` is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string, a directory descriptor we hold and a
        // `stat` to fill.
        match retry(|| unsafe {
            libc::fstatat(self.fd.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW)
        }) {
            Ok(_) => Ok(Some(Entry::of(&st))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes file (or symlink) `name`; false if there was none.
    pub fn remove_file(&self, name: &str) -> io::Result<bool> {
        let name = component(name)?;
        // SAFETY: a valid C string and a directory descriptor we hold.
        match retry(|| unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), 0) }) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes the empty directory `name`.
    pub fn remove_dir(&self, name: &str) -> io::Result<()> {
        let name = component(name)?;
        // SAFETY: a valid C string and a directory descriptor we hold.
        retry(|| unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
    }

    /// Renames entry `name` of this directory to `to_name` in `to`,
    /// replacing a file there (never following a symlink: one there is
    /// replaced, not written through).
    pub fn rename(&self, name: &str, to: &Dir, to_name: &str) -> io::Result<()> {
        let (name, to_name) = (component(name)?, component(to_name)?);
        // SAFETY: valid C strings and directory descriptors we hold.
        retry(|| unsafe {
            libc::renameat(self.fd.as_raw_fd(), name.as_ptr(), to.fd.as_raw_fd(), to_name.as_ptr())
        })
        .map(drop)
    }

    /// What this directory is.
    pub fn stat(&self) -> io::Result<Entry> {
        // SAFETY: zeroed `stat` is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we hold and a `stat` to fill.
        check(unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) })?;
        Ok(Entry::of(&st))
    }

    /// Sets this directory's permission bits.
    pub fn set_mode(&self, mode: u32) -> io::Result<()> {
        // SAFETY: a descriptor we hold.
        check(unsafe { libc::fchmod(self.fd.as_raw_fd(), mode as libc::mode_t) }).map(drop)
    }

    /// Creates symlink `name` leading to `target` (never replacing
    /// anything).
    pub fn symlink(&self, target: &str, name: &str) -> io::Result<()> {
        let (target, name) = (
            CString::new(target)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a link target"))?,
            component(name)?,
        );
        // SAFETY: valid C strings and a directory descriptor we hold.
        retry(|| unsafe { libc::symlinkat(target.as_ptr(), self.fd.as_raw_fd(), name.as_ptr()) }).map(drop)
    }

    /// Sets the mtime of entry `name` itself (a symlink's own, never its
    /// target's); the access time is left alone.
    pub fn set_mtime_of(&self, name: &str, mtime_ns: i64) -> io::Result<()> {
        let name = component(name)?;
        let times = [omit(), timespec(mtime_ns)];
        // SAFETY: a valid C string, a directory descriptor we hold and two
        // timespecs.
        retry(|| unsafe {
            libc::utimensat(self.fd.as_raw_fd(), name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
        })
        .map(drop)
    }

    /// Sets this directory's own mtime.
    pub fn set_mtime(&self, mtime_ns: i64) -> io::Result<()> {
        let times = [omit(), timespec(mtime_ns)];
        // SAFETY: a descriptor we hold and two timespecs.
        check(unsafe { libc::futimens(self.fd.as_raw_fd(), times.as_ptr()) }).map(drop)
    }

    /// Sets the permission bits of regular file `name`, never through a
    /// symlink: the file is opened as a path (`O_PATH | O_NOFOLLOW`),
    /// checked, and changed through its descriptor's `/proc` name, so a
    /// link swapped in meanwhile is refused rather than followed.
    pub fn set_file_mode(&self, name: &str, mode: u32) -> io::Result<()> {
        let name = component(name)?;
        // SAFETY: a valid C string and a directory descriptor we hold.
        let fd = retry(|| unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed `stat` is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we hold and a `stat` to fill.
        check(unsafe { libc::fstat(file.as_raw_fd(), &mut st) })?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::other(format!("{} is not a regular file", name.to_string_lossy())));
        }
        let proc = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(io::Error::other)?;
        // SAFETY: a valid C string.
        retry(|| unsafe { libc::chmod(proc.as_ptr(), mode as libc::mode_t) }).map(drop)
    }

    /// A path that names this very directory (through `/proc`), for
    /// listing it with `std::fs::read_dir` whatever happened to the path
    /// it was opened by.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// Holds an exclusive `flock` on this handle's file, or fails at once.
    pub fn lock_file(file: &File) -> io::Result<()> {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        check(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }).map(drop)
    }
}

/// What `lstat` says of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub kind: Kind,
    pub uid: u32,
    pub mode: u32,
    pub size: u64,
    pub mtime_ns: i128,
    pub inode: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Entry {
    fn of(st: &libc::stat) -> Entry {
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        };
        Entry {
            kind,
            uid: st.st_uid,
            mode: st.st_mode & 0o7777,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128,
            inode: st.st_ino,
        }
    }
}

/// A timespec of `ns` nanoseconds since the Unix epoch (before it if
/// negative).
fn timespec(ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: ns.div_euclid(1_000_000_000) as libc::time_t,
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

/// "Leave this time alone".
fn omit() -> libc::timespec {
    libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }
}

/// Sets an open file's permission bits and mtime.
pub(crate) fn set_file_attrs(file: &File, mode: u32, mtime_ns: i64) -> io::Result<()> {
    // SAFETY: a descriptor we hold.
    check(unsafe { libc::fchmod(file.as_raw_fd(), mode as libc::mode_t) })?;
    let times = [omit(), timespec(mtime_ns)];
    // SAFETY: a descriptor we hold and two timespecs.
    check(unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) }).map(drop)
}

/// The effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;

    #[test]
    fn nothing_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"keep").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("linkdir")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("victim"), dir.path().join("linkfile")).unwrap();
        let root = Dir::open(dir.path()).unwrap();
        assert!(is_symlink_error(&root.open_dir("linkdir").unwrap_err()));
        assert!(root.open_file("linkfile", libc::O_RDWR | libc::O_TRUNC, 0).is_err());
        assert!(root.create_new("linkfile", 0o600).is_err());
        assert_eq!(root.entry("linkfile").unwrap().unwrap().kind, Kind::Symlink);
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(root.open_dir(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn links_times_and_modes_never_go_through_a_link() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"keep").unwrap();
        fs::set_permissions(outside.path().join("victim"), fs::Permissions::from_mode(0o644)).unwrap();
        let root = Dir::open(dir.path()).unwrap();
        root.symlink(outside.path().join("victim").to_str().unwrap(), "link").unwrap();
        assert!(root.symlink("other", "link").is_err(), "never replaces");
        assert_eq!(fs::read_link(dir.path().join("link")).unwrap(), outside.path().join("victim"));
        let before = fs::metadata(outside.path().join("victim")).unwrap();
        root.set_mtime_of("link", -1_500_000_001).unwrap();
        let link = fs::symlink_metadata(dir.path().join("link")).unwrap();
        assert_eq!((link.mtime(), link.mtime_nsec()), (-2, 499_999_999));
        assert!(root.set_file_mode("link", 0o777).is_err());
        let after = fs::metadata(outside.path().join("victim")).unwrap();
        assert_eq!((after.mtime(), after.mode()), (before.mtime(), before.mode()), "the target is untouched");
        fs::write(dir.path().join("f"), b"x").unwrap();
        root.set_file_mode("f", 0o4640).unwrap();
        assert_eq!(fs::metadata(dir.path().join("f")).unwrap().mode() & 0o7777, 0o4640);
        root.set_mtime(1_000_000_000_123).unwrap();
        assert_eq!(fs::metadata(dir.path()).unwrap().mtime_nsec(), 123);
    }

    #[test]
    fn files_are_made_and_moved_by_handle() {
        let dir = tempfile::tempdir().unwrap();
        let root = Dir::open(dir.path()).unwrap();
        assert!(root.make_dir("sub", 0o755).unwrap());
        assert!(!root.make_dir("sub", 0o755).unwrap());
        let sub = root.open_dir("sub").unwrap();
        let mut file = sub.create_new("f", 0o644).unwrap();
        file.write_all(b"x").unwrap();
        assert!(sub.create_new("f", 0o644).is_err(), "O_EXCL");
        sub.rename("f", &root, "g").unwrap();
        assert_eq!(fs::read(dir.path().join("g")).unwrap(), b"x");
        assert!(root.remove_file("g").unwrap());
        assert!(!root.remove_file("g").unwrap());
        root.remove_dir("sub").unwrap();
        assert!(fs::read_dir(root.proc_path()).unwrap().next().is_none());
    }
}

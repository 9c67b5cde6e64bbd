//! CURVE keys: Z85 text, key files in the CZMQ certificate format, and the
//! options a client socket needs. The broker (`zbroker keygen`, its secret
//! key and its allow-list) and the clients share this module.
//!
//! A key file is read leniently: the key is the last whitespace-separated
//! token of its last non-empty line, with any surrounding quotes removed,
//! 40 characters of Z85. So a CZMQ certificate (`public-key = "…"` last in
//! a `.pub`, `secret-key = "…"` last in a secret file) and a file holding
//! nothing but the key both work. A secret key file must also hold a
//! `public-key = "…"` line (libzmq offers no way here to derive it).
//!
//! ```no_run
//! use zbroker_client::curve::{self, ClientKeys};
//!
//! let server = curve::read_public_key("broker.pub".as_ref())?;
//! let keys = ClientKeys::ephemeral(server)?;
//! # Ok::<(), curve::KeyError>(())
//! ```

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// A CURVE key (public or secret), 32 bytes.
pub type Key = [u8; 32];

/// The Z85 alphabet (ZeroMQ RFC 32).
const Z85: &[u8; 85] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

/// Why a key could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists: not overwriting it")]
    Exists(PathBuf),
    #[error("key file {path}: {why}")]
    Bad { path: PathBuf, why: KeyTextError },
    #[error("libzmq cannot make CURVE keys: {0}")]
    Zmq(#[from] zmq::Error),
}

/// Why a text holds no usable key. Its `Display` is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyTextError {
    #[error("a CURVE key is 40 characters of Z85, not {0}")]
    Length(usize),
    #[error("{0:?} is not a Z85 character")]
    NotZ85(char),
    #[error("not a valid Z85 key")]
    OutOfRange,
    #[error("the file is empty")]
    Empty,
    #[error("{SECRET_NOT_PUBLIC}")]
    SecretNotPublic,
    #[error("no `public-key = \"...\"` line (a secret key file holds both keys)")]
    NoPublicKeyLine,
    #[error("this is a public key file, not a secret key file")]
    PublicNotSecret,
    /// The secret key of a secret key file is unusable.
    #[error("secret key: {0}")]
    Secret(Box<KeyTextError>),
    /// The public key of a secret key file is unusable.
    #[error("public key: {0}")]
    Public(Box<KeyTextError>),
}

/// `key` as 40 characters of Z85.
pub fn z85_encode(key: &Key) -> String {
    let mut out = String::with_capacity(40);
    for word in key.chunks_exact(4) {
        let mut value = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        let mut digits = [0u8; 5];
        for digit in digits.iter_mut().rev() {
            *digit = Z85[(value % 85) as usize];
            value /= 85;
        }
        out.extend(digits.iter().map(|&d| d as char));
    }
    out
}

/// A key from 40 characters of Z85, or why not.
pub fn z85_decode(text: &str) -> Result<Key, KeyTextError> {
    let bytes = text.as_bytes();
    if bytes.len() != 40 {
        return Err(KeyTextError::Length(text.chars().count()));
    }
    let mut key = [0u8; 32];
    for (group, out) in bytes.chunks_exact(5).zip(key.chunks_exact_mut(4)) {
        let mut value: u64 = 0;
        for &c in group {
            let digit = Z85.iter().position(|&z| z == c).ok_or(KeyTextError::NotZ85(c as char))?;
            value = value * 85 + digit as u64;
        }
        let value = u32::try_from(value).map_err(|_| KeyTextError::OutOfRange)?;
        out.copy_from_slice(&value.to_be_bytes());
    }
    Ok(key)
}

/// The key in a key file's text: the last token of the last non-empty
/// line, quotes stripped.
pub fn parse_key_text(text: &str) -> Result<Key, KeyTextError> {
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).ok_or(KeyTextError::Empty)?;
    key_token(line)
}

/// The last whitespace-separated token of `line` as a key.
fn key_token(line: &str) -> Result<Key, KeyTextError> {
    let token = line.split_whitespace().last().unwrap_or("");
    let token = token.trim_matches(|c| c == '"' || c == '\'');
    z85_decode(token)
}

fn read_text(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read { path: path.to_path_buf(), source })
}

fn bad(path: &Path, why: KeyTextError) -> KeyError {
    KeyError::Bad { path: path.to_path_buf(), why }
}

/// What is said when a secret key file is given where a public key is
/// wanted (its last line is the secret key, which would parse).
pub const SECRET_NOT_PUBLIC: &str = "that is a secret key file; pass the broker's .pub file";

/// The key in a public key file's text; a secret key file is refused.
pub fn parse_public_key_text(text: &str) -> Result<Key, KeyTextError> {
    let secret = text.lines().any(|l| {
        let first = l.split_whitespace().next().unwrap_or("");
        first == "secret-key" || first.starts_with("secret-key=")
    });
    if secret {
        return Err(KeyTextError::SecretNotPublic);
    }
    parse_key_text(text)
}

/// The key in a public key file (a `.pub` certificate, or any file whose
/// last token is the key). A secret key file is refused with
/// [`SECRET_NOT_PUBLIC`] ([`KeyTextError::SecretNotPublic`]).
pub fn read_public_key(path: &Path) -> Result<Key, KeyError> {
    parse_public_key_text(&read_text(path)?).map_err(|why| bad(path, why))
}

/// Every public key named by `path`: the file's key, or if it is a
/// directory, the key of every file in it. Hidden files and
/// subdirectories are skipped, and so are files that are not public key
/// files (a `README`, a secret key), each with a warning naming it.
pub fn read_public_keys(path: &Path) -> Result<Vec<Key>, KeyError> {
    let read_error = |source| KeyError::Read { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_dir() {
        return Ok(vec![read_public_key(path)?]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let file = std::fs::metadata(entry.path()).map(|m| m.is_file()).unwrap_or(false);
        if file && !hidden {
            files.push(entry.path());
        }
    }
    files.sort();
    let mut keys = Vec::with_capacity(files.len());
    for file in &files {
        match read_public_key(file) {
            Ok(key) => keys.push(key),
            Err(KeyError::Bad { path, why }) => {
                tracing::warn!("{}: not a public key file ({why}): skipped", path.display())
            }
            Err(e) => return Err(e),
        }
    }
    Ok(keys)
}

/// A CURVE key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub public: Key,
    pub secret: Key,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair").field("public", &z85_encode(&self.public)).finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh random key pair.
    pub fn generate() -> Result<KeyPair, KeyError> {
        let pair = zmq::CurveKeyPair::new()?;
        Ok(KeyPair { public: pair.public_key, secret: pair.secret_key })
    }

    /// Parses a secret key file's text: the secret key is the last token
    /// of the last non-empty line, the public key that of the last line
    /// before it whose first token is `public-key`.
    pub fn parse(text: &str) -> Result<KeyPair, KeyTextError> {
        let secret = parse_key_text(text).map_err(|why| KeyTextError::Secret(Box::new(why)))?;
        let line = text
            .lines()
            .rev()
            .find(|l| {
                let first = l.split_whitespace().next().unwrap_or("");
                first == "public-key" || first.starts_with("public-key=")
            })
            .ok_or(KeyTextError::NoPublicKeyLine)?;
        let public = key_token(line).map_err(|why| KeyTextError::Public(Box::new(why)))?;
        if public == secret {
            return Err(KeyTextError::PublicNotSecret);
        }
        Ok(KeyPair { public, secret })
    }

    /// Reads a secret key file (as `zbroker keygen` writes it).
    pub fn read(path: &Path) -> Result<KeyPair, KeyError> {
        KeyPair::parse(&read_text(path)?).map_err(|why| bad(path, why))
    }

    /// The secret key file's text, in the CZMQ certificate format.
    pub fn secret_file_text(&self) -> String {
        format!(
            "#   ****  Generated by zbroker keygen  ****\n\
             #   ZeroMQ CURVE **Secret** Certificate\n\
             #   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\
             \n\
             metadata\n\
             curve\n    public-key = \"{}\"\n    secret-key = \"{}\"\n",
            z85_encode(&self.public),
            z85_encode(&self.secret)
        )
    }

    /// The public key file's text, in the CZMQ certificate format.
    pub fn public_file_text(&self) -> String {
        format!(
            "#   ****  Generated by zbroker keygen  ****\n\
             #   ZeroMQ CURVE Public Certificate\n\
             #   Exchange securely, or use a secure mechanism to verify the contents\n\
             #   of this file after exchange.\n\
             \n\
             metadata\n\
             curve\n    public-key = \"{}\"\n",
            z85_encode(&self.public)
        )
    }

    /// Writes `path` (the secret key, mode 0600) and `path.pub` (the public
    /// key). Neither may exist already.
    pub fn write(&self, path: &Path) -> Result<PathBuf, KeyError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let public_path = public_path(path);
        for p in [path, &public_path] {
            if p.symlink_metadata().is_ok() {
                return Err(KeyError::Exists(p.to_path_buf()));
            }
        }
        let create = |p: &Path, mode: u32, text: String| -> Result<(), KeyError> {
            let write_error = |source| KeyError::Write { path: p.to_path_buf(), source };
            let mut file =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(p).map_err(|e| {
                    match e.kind() {
                        std::io::ErrorKind::AlreadyExists => KeyError::Exists(p.to_path_buf()),
                        _ => write_error(e),
                    }
                })?;
            // The umask may only have taken bits away; make it exact.
            let written = file
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .and_then(|()| file.write_all(text.as_bytes()))
                .and_then(|()| file.sync_all());
            if let Err(e) = written {
                // A truncated key file would block the next keygen.
                let _ = std::fs::remove_file(p);
                return Err(write_error(e));
            }
            Ok(())
        };
        create(path, 0o600, self.secret_file_text())?;
        if let Err(e) = create(&public_path, 0o644, self.public_file_text()) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(public_path)
    }
}

/// `PATH.pub` for a secret key file `PATH`.
pub fn public_path(secret: &Path) -> PathBuf {
    let mut name = secret.as_os_str().to_os_string();
    name.push(".pub");
    PathBuf::from(name)
}

/// What a client needs to speak CURVE to a broker: the broker's public
/// key and a key pair of its own.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKeys {
    pub server_public: Key,
    pub public: Key,
    pub secret: Key,
}

impl fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKeys")
            .field("server_public", &z85_encode(&self.server_public))
            .field("public", &z85_encode(&self.public))
            .finish_non_exhaustive()
    }
}

impl ClientKeys {
    /// The server's public key and our own key pair.
    pub fn new(server_public: Key, own: KeyPair) -> ClientKeys {
        ClientKeys { server_public, public: own.public, secret: own.secret }
    }

    /// The server's public key and a fresh key pair made for this client
    /// (enough when the broker allows any client that knows its key).
    pub fn ephemeral(server_public: Key) -> Result<ClientKeys, KeyError> {
        Ok(ClientKeys::new(server_public, KeyPair::generate()?))
    }

    /// Reads the server's public key file and, if given, our secret key
    /// file (otherwise a fresh key pair is made).
    pub fn from_files(server_key: &Path, own_key: Option<&Path>) -> Result<ClientKeys, KeyError> {
        let server_public = read_public_key(server_key)?;
        match own_key {
            Some(path) => Ok(ClientKeys::new(server_public, KeyPair::read(path)?)),
            None => ClientKeys::ephemeral(server_public),
        }
    }

    /// Makes `socket` a CURVE client with these keys (before it connects).
    pub fn apply(&self, socket: &zmq::Socket) -> zmq::Result<()> {
        socket.set_curve_serverkey(&self.server_public)?;
        socket.set_curve_publickey(&self.public)?;
        socket.set_curve_secretkey(&self.secret)
    }
}

/// The advice given when a CURVE handshake fails or never completes.
pub const HINT: &str = "is --server-key right, and is this client's key allowed?";
/// The advice given when a handshake without keys fails.
pub const HINT_NO_KEYS: &str = "the handshake failed: does the broker require CURVE (--server-key)?";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_key_file_is_no_public_key() {
        let pair = KeyPair::generate().unwrap();
        assert_eq!(parse_public_key_text(&pair.public_file_text()), Ok(pair.public));
        assert_eq!(parse_public_key_text(&pair.secret_file_text()), Err(KeyTextError::SecretNotPublic));
        let dir = tempfile::tempdir().unwrap();
        pair.write(&dir.path().join("server")).unwrap();
        let e = ClientKeys::from_files(&dir.path().join("server"), None).unwrap_err().to_string();
        assert!(e.contains("that is a secret key file; pass the broker's .pub file"), "{e}");
    }

    #[test]
    fn files_in_a_key_directory_that_hold_no_key_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let pair = KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("alice.pub"), pair.public_file_text()).unwrap();
        std::fs::write(dir.path().join("README"), "Put the clients' .pub files here.\n").unwrap();
        std::fs::write(dir.path().join("empty"), "").unwrap();
        assert_eq!(read_public_keys(dir.path()).unwrap(), vec![pair.public]);
        // Named on its own, a file that is not a key is an error.
        assert!(read_public_keys(&dir.path().join("README")).is_err());
    }

    #[test]
    fn z85_round_trips_and_matches_libzmq() {
        for _ in 0..20 {
            let pair = KeyPair::generate().unwrap();
            let text = z85_encode(&pair.public);
            assert_eq!(text, zmq::z85_encode(&pair.public).unwrap());
            assert_eq!(z85_decode(&text).unwrap(), pair.public);
        }
        // The RFC 32 test vector, padded to a key's length.
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&[0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B]);
        assert!(z85_encode(&key).starts_with("HelloWorld"));
    }

    #[test]
    fn bad_z85_is_refused() {
        assert!(z85_decode("short").is_err());
        assert!(z85_decode(&"~".repeat(40)).is_err());
        assert!(z85_decode(&"\"".repeat(40)).is_err());
        // 85^5 - 1 overflows 32 bits.
        assert!(z85_decode(&"#".repeat(40)).is_err());
        assert!(z85_decode(&"é".repeat(20)).is_err());
    }

    #[test]
    fn key_files_parse_leniently() {
        let pair = KeyPair::generate().unwrap();
        let z = z85_encode(&pair.public);
        assert_eq!(parse_key_text(&pair.public_file_text()), Ok(pair.public));
        assert_eq!(parse_key_text(&z), Ok(pair.public));
        assert_eq!(parse_key_text(&format!("\n  {z}  \n\n")), Ok(pair.public));
        assert_eq!(parse_key_text(&format!("key: '{z}'\n")), Ok(pair.public));
        assert_eq!(parse_key_text(&format!("public-key=\"{z}\"\r\n")).ok(), None, "no space: one token");
        assert_eq!(parse_key_text(&format!("public-key = \"{z}\"\r\n")), Ok(pair.public));
        assert!(parse_key_text("").is_err());
        assert!(parse_key_text("\n \n").is_err());
        assert!(parse_key_text(&format!("{z}\nnot a key\n")).is_err());
        assert!(parse_key_text(&format!("{z}x")).is_err());
    }

    #[test]
    fn secret_files_hold_both_keys() {
        let pair = KeyPair::generate().unwrap();
        assert_eq!(KeyPair::parse(&pair.secret_file_text()), Ok(pair.clone()));
        // Only the secret key: no public key to go with it.
        assert!(KeyPair::parse(&z85_encode(&pair.secret)).is_err());
        // A public certificate is not a secret one.
        assert!(KeyPair::parse(&pair.public_file_text()).is_err());
        let debug = format!("{pair:?}");
        assert!(!debug.contains(&z85_encode(&pair.secret)), "Debug must not show the secret key");
    }

    #[test]
    fn keygen_files_are_written_once_with_private_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server");
        let pair = KeyPair::generate().unwrap();
        let public = pair.write(&path).unwrap();
        assert_eq!(public, dir.path().join("server.pub"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(KeyPair::read(&path).unwrap(), pair);
        assert_eq!(read_public_key(&public).unwrap(), pair.public);
        assert!(matches!(KeyPair::generate().unwrap().write(&path), Err(KeyError::Exists(_))));
        assert_eq!(KeyPair::read(&path).unwrap(), pair, "unchanged");
        // A directory of public keys: every visible file.
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        let other = KeyPair::generate().unwrap();
        std::fs::copy(&public, keys.join("a.pub")).unwrap();
        std::fs::write(keys.join("b"), z85_encode(&other.public)).unwrap();
        std::fs::write(keys.join(".b.swp"), "junk").unwrap();
        let mut found = read_public_keys(&keys).unwrap();
        found.sort();
        let mut want = vec![pair.public, other.public];
        want.sort();
        assert_eq!(found, want);
        // A file that is no key is skipped (with a warning), not fatal.
        std::fs::write(keys.join("c"), "junk").unwrap();
        assert_eq!(read_public_keys(&keys).unwrap().len(), 2);
        assert!(read_public_keys(&keys.join("c")).unwrap_err().to_string().contains("keys/c"));
    }
}

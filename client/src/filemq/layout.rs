//! Which names a server may send us, and where each lands in the inbox.
//!
//! Every filename in a CHEEZBURGER comes from the network, so it is checked
//! here before anything touches the disk: it must lie under one of our
//! subscriptions, and what is left after stripping must be a plain relative
//! path of visible, non-empty, non-`.`/`..` components. Anything else is
//! refused with a reason. (The inbox module then checks the disk itself for
//! symlinks on the way.)

use zbroker_proto::vpath;

/// How the subscriptions map virtual paths into the inbox.
///
/// - One subscription path `P`: a file `P/rest` lands at `<inbox>/rest`, as
///   with the original newest client (docs/protocol/FILEMQ.md "Our subscriber").
/// - Several: a file `/full/path` lands at `<inbox>/full/path`, so that two
///   subscriptions can never write the same inbox file.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    /// Normalised, without duplicates, none covering another.
    subscriptions: Vec<String>,
    full_paths: bool,
}

/// Where an accepted name lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placed {
    /// Index into [`Layout::subscriptions`].
    pub subscription: usize,
    /// Inbox-relative path, `/`-separated, every component checked.
    pub rel: String,
}

/// Checks a subscription path given by the user and brings it to the one
/// form we send and compare (the virtual-path rules of `zbroker-proto`).
pub(crate) fn normalise_subscription(path: &str) -> Result<String, &'static str> {
    vpath::normalise(path).map_err(vpath::PathError::reason)
}

/// The checks every inbox-relative path passes.
fn check_components(rel: &str) -> Result<(), &'static str> {
    if rel.is_empty() {
        return Err("names no file below the subscription");
    }
    if rel.starts_with('/') {
        return Err("is absolute after stripping the subscription");
    }
    vpath::check_relative(rel).map_err(vpath::PathError::reason)
}

impl Layout {
    /// The layout for the subscription paths the user gave. A path covered
    /// by another is dropped (the server would coalesce it anyway), but
    /// giving several distinct paths always selects full-path placement.
    /// Errors name the offending path and why.
    pub fn new(paths: &[String]) -> Result<Layout, (String, &'static str)> {
        let mut normalised: Vec<String> = Vec::new();
        for path in paths {
            let n = normalise_subscription(path).map_err(|why| (path.clone(), why))?;
            if !normalised.contains(&n) {
                normalised.push(n);
            }
        }
        if normalised.is_empty() {
            return Err((String::new(), "at least one subscription path is needed"));
        }
        let full_paths = normalised.len() > 1;
        let subscriptions: Vec<String> = normalised
            .iter()
            .filter(|p| !normalised.iter().any(|q| q != *p && vpath::covers(q, p)))
            .cloned()
            .collect();
        Ok(Layout { subscriptions, full_paths })
    }

    /// The subscription paths sent in ICANHAZ, normalised.
    pub fn subscriptions(&self) -> &[String] {
        &self.subscriptions
    }

    /// The inbox-relative directory that mirrors subscription `sub` (empty
    /// for the inbox itself): its files are that subscription's cache.
    pub fn mirror_dir(&self, sub: usize) -> &str {
        if self.full_paths {
            self.subscriptions[sub].trim_start_matches('/')
        } else {
            ""
        }
    }

    /// Where a server-sent filename lands, or why it is refused.
    pub fn place(&self, name: &[u8]) -> Result<Placed, &'static str> {
        let name = std::str::from_utf8(name).map_err(|_| "is not UTF-8")?;
        if name.contains('\0') {
            return Err("contains a NUL byte");
        }
        if !name.starts_with('/') {
            return Err("is not an absolute virtual path");
        }
        let subscription = self
            .subscriptions
            .iter()
            .position(|s| vpath::covers(s, name))
            .ok_or("matches no subscription")?;
        let rel = if self.full_paths {
            &name[1..]
        } else {
            let sub = &self.subscriptions[subscription];
            if sub == "/" {
                &name[1..]
            } else if name.len() == sub.len() {
                ""
            } else {
                &name[sub.len() + 1..]
            }
        };
        check_components(rel)?;
        Ok(Placed { subscription, rel: rel.to_string() })
    }

    /// The ICANHAZ cache key for inbox-relative file `rel` held for
    /// subscription `sub`: relative to the subscription path, or the
    /// absolute virtual path when the file *is* the subscription path.
    /// `None` if the file does not belong to that subscription.
    pub fn cache_key(&self, sub: usize, rel: &str) -> Option<String> {
        let dir = self.mirror_dir(sub);
        if dir.is_empty() {
            return Some(rel.to_string());
        }
        if rel == dir {
            return Some(self.subscriptions[sub].clone());
        }
        rel.strip_prefix(dir)?.strip_prefix('/').map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::path::{Component, Path};

    fn layout(paths: &[&str]) -> Layout {
        Layout::new(&paths.iter().map(|p| p.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn place(l: &Layout, name: &str) -> Result<String, &'static str> {
        l.place(name.as_bytes()).map(|p| p.rel)
    }

    #[test]
    fn subscription_paths_are_normalised_or_refused() {
        assert_eq!(normalise_subscription("/"), Ok("/".into()));
        assert_eq!(normalise_subscription("///"), Ok("/".into()));
        assert_eq!(normalise_subscription("/data/"), Ok("/data".into()));
        assert_eq!(normalise_subscription("/a/b"), Ok("/a/b".into()));
        for bad in ["", "data", "/a//b", "/a/./b", "/a/../b", "/.hidden", "/a/\0"] {
            assert!(normalise_subscription(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn one_subscription_strips_its_path() {
        let l = layout(&["/data"]);
        assert_eq!(place(&l, "/data/a.txt"), Ok("a.txt".into()));
        assert_eq!(place(&l, "/data/sub/x.txt"), Ok("sub/x.txt".into()));
        assert_eq!(place(&l, "/data"), Err("names no file below the subscription"));
        assert_eq!(place(&l, "/datax/a"), Err("matches no subscription"));
        assert_eq!(place(&l, "/other/a"), Err("matches no subscription"));
        assert_eq!(l.mirror_dir(0), "");
        assert_eq!(l.cache_key(0, "sub/x.txt"), Some("sub/x.txt".into()));
    }

    #[test]
    fn a_trailing_slash_subscription_means_the_directory() {
        let l = layout(&["/data/"]);
        assert_eq!(l.subscriptions(), ["/data"]);
        assert_eq!(place(&l, "/data/a"), Ok("a".into()));
        assert_eq!(place(&l, "/data//a"), Err("is absolute after stripping the subscription"));
    }

    #[test]
    fn the_root_subscription_takes_everything() {
        let l = layout(&["/"]);
        assert_eq!(place(&l, "/a/b"), Ok("a/b".into()));
        assert_eq!(place(&l, "/"), Err("names no file below the subscription"));
        assert_eq!(place(&l, "//etc/passwd"), Err("is absolute after stripping the subscription"));
    }

    #[test]
    fn several_subscriptions_keep_full_paths() {
        let l = layout(&["/a", "/b/c", "/a/x", "/b/c/"]);
        assert_eq!(l.subscriptions(), ["/a", "/b/c"], "duplicates and covered paths dropped");
        assert_eq!(place(&l, "/a/f"), Ok("a/f".into()));
        assert_eq!(place(&l, "/b/c/d/f"), Ok("b/c/d/f".into()));
        assert_eq!(place(&l, "/b/c"), Ok("b/c".into()), "the subscription path itself is a file");
        assert_eq!(place(&l, "/b/f"), Err("matches no subscription"));
        assert_eq!(l.mirror_dir(1), "b/c");
        assert_eq!(l.cache_key(1, "b/c/d/f"), Some("d/f".into()));
        assert_eq!(l.cache_key(1, "b/c"), Some("/b/c".into()));
        assert_eq!(l.cache_key(1, "b/cd"), None);
        assert_eq!(l.cache_key(0, "b/c/d"), None);
    }

    #[test]
    fn hostile_names_are_refused() {
        let l = layout(&["/data"]);
        for (name, why) in [
            ("/data/../etc/passwd", "has a '.' or '..' component"),
            ("/data/a/../../x", "has a '.' or '..' component"),
            ("/data/./a", "has a '.' or '..' component"),
            ("/data/a//b", "has an empty path component"),
            ("/data/a/", "has an empty path component"),
            ("/data/.filemq/partial/x", "has a hidden component"),
            ("/data/.bashrc", "has a hidden component"),
            ("/data/a\0b", "contains a NUL byte"),
            ("data/a", "is not an absolute virtual path"),
            ("", "is not an absolute virtual path"),
        ] {
            assert_eq!(place(&l, name), Err(why), "{name:?}");
        }
        assert_eq!(l.place(b"/data/\xff"), Err("is not UTF-8"));
        assert!(place(&l, &format!("/data/{}", "x".repeat(256))).is_err());
        let multi = layout(&["/a", "/b"]);
        assert_eq!(place(&multi, "/a/../../x"), Err("has a '.' or '..' component"));
    }

    /// Names built from the pieces that matter, so that the interesting
    /// cases are common rather than one in a billion.
    fn hostile_name() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"/".to_vec()),
            Just(b"..".to_vec()),
            Just(b".".to_vec()),
            Just(b"data".to_vec()),
            Just(b"a".to_vec()),
            Just(b".x".to_vec()),
            Just(b"\0".to_vec()),
            Just(b"\\".to_vec()),
            Just(vec![0xff]),
            proptest::collection::vec(any::<u8>(), 0..4),
        ];
        proptest::collection::vec(piece, 0..10).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        /// Any server-sent name either resolves to a path strictly inside the
        /// inbox, made of plain visible components, or is refused.
        #[test]
        fn any_name_lands_inside_the_inbox_or_is_refused(
            name in hostile_name(),
            subs in proptest::sample::select(vec![vec!["/"], vec!["/data"], vec!["/data", "/a"]]),
        ) {
            let l = layout(&subs);
            if let Ok(placed) = l.place(&name) {
                let inbox = Path::new("/inbox");
                let full = inbox.join(&placed.rel);
                prop_assert!(full.starts_with(inbox));
                prop_assert!(full != inbox);
                for component in Path::new(&placed.rel).components() {
                    match component {
                        Component::Normal(c) => {
                            let c = c.to_str().unwrap();
                            prop_assert!(!c.starts_with('.') && !c.contains('\0'));
                        }
                        other => prop_assert!(false, "component {:?} in {:?}", other, placed.rel),
                    }
                }
                prop_assert_eq!(Path::new(&placed.rel).components().count(), placed.rel.split('/').count());
            }
        }
    }
}

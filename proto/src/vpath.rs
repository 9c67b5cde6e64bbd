//! FILEMQ's virtual paths: the names a broker publishes files under and a
//! subscriber asks for (`/photos/2024/a.jpg`). One set of rules, used by
//! the broker for aliases, ICANHAZ paths and caches, and by the subscriber
//! for its subscriptions and every name a server sends.
//!
//! A virtual path starts with `/` and is made of plain components: none
//! empty, `.` or `..`, none hidden (starting with `.`: publishers never
//! publish hidden files, and a subscriber keeps its own state in
//! `.filemq/`), none longer than 255 bytes, no NUL, at most
//! [`MAX_PATH`] bytes in all. The root `/` is the one path with no
//! component.

/// Longest virtual path, in bytes: the limit of the original server.
pub const MAX_PATH: usize = 4096;

/// Longest component, in bytes: what Linux file systems allow.
pub const MAX_COMPONENT: usize = 255;

/// Why a path is not a virtual path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.reason())]
pub enum PathError {
    NotAbsolute,
    TooLong,
    Nul,
    EmptyComponent,
    DotComponent,
    HiddenComponent,
    LongComponent,
}

impl PathError {
    /// What the subscriber shows beside a refused name ("… has a hidden
    /// component").
    pub fn reason(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "must start with '/'",
            PathError::TooLong => "is longer than 4096 bytes",
            PathError::Nul => "contains a NUL byte",
            PathError::EmptyComponent => "has an empty path component",
            PathError::DotComponent => "has a '.' or '..' component",
            PathError::HiddenComponent => "has a hidden component",
            PathError::LongComponent => "has a component longer than 255 bytes",
        }
    }
}

/// Brings `path` to the one form we send and compare: the rules above, and
/// no trailing `/` (except the root itself).
pub fn normalise(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if path.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok("/".to_string());
    }
    check_relative(&trimmed[1..])?;
    Ok(trimmed.to_string())
}

/// Checks a path relative to a virtual directory (`2024/a.jpg`): one or
/// more components, each plain.
pub fn check_relative(rel: &str) -> Result<(), PathError> {
    if rel.contains('\0') {
        return Err(PathError::Nul);
    }
    if rel.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    for component in rel.split('/') {
        match component {
            "" => return Err(PathError::EmptyComponent),
            "." | ".." => return Err(PathError::DotComponent),
            c if c.starts_with('.') => return Err(PathError::HiddenComponent),
            c if c.len() > MAX_COMPONENT => return Err(PathError::LongComponent),
            _ => {}
        }
    }
    Ok(())
}

/// Does `path` cover `vpath` (both normalised)? Whole components only:
/// `/photo` does not cover `/photos/x` (the original's plain string
/// prefix did).
pub fn covers(path: &str, vpath: &str) -> bool {
    if path == "/" {
        return vpath.starts_with('/');
    }
    vpath == path || (vpath.starts_with(path) && vpath.as_bytes().get(path.len()) == Some(&b'/'))
}

/// `vpath` relative to `dir`, which covers it (`""` for `dir` itself).
pub fn relative<'a>(dir: &str, vpath: &'a str) -> &'a str {
    let rest = if dir == "/" { vpath.get(1..) } else { vpath.get(dir.len()..) };
    rest.unwrap_or("").trim_start_matches('/')
}

/// The virtual path of `rel` under the virtual directory `dir`.
pub fn join(dir: &str, rel: &str) -> String {
    if dir == "/" {
        format!("/{rel}")
    } else {
        format!("{dir}/{rel}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_are_normalised_or_refused() {
        assert_eq!(normalise("/"), Ok("/".into()));
        assert_eq!(normalise("///"), Ok("/".into()));
        assert_eq!(normalise("/data/"), Ok("/data".into()));
        assert_eq!(normalise("/a/b"), Ok("/a/b".into()));
        let refused = [
            ("", PathError::NotAbsolute),
            ("data", PathError::NotAbsolute),
            ("/a//b", PathError::EmptyComponent),
            ("/a/./b", PathError::DotComponent),
            ("/a/../b", PathError::DotComponent),
            ("/.hidden", PathError::HiddenComponent),
            ("/a/.filemq/x", PathError::HiddenComponent),
            ("/a/\0", PathError::Nul),
        ];
        for (path, why) in refused {
            assert_eq!(normalise(path), Err(why), "{path:?}");
        }
        assert_eq!(normalise(&format!("/{}", "x".repeat(256))), Err(PathError::LongComponent));
        assert_eq!(normalise(&"/x".repeat(2049)), Err(PathError::TooLong));
        assert!(normalise(&"/x".repeat(2048)).is_ok());
    }

    #[test]
    fn covering_is_by_whole_components() {
        assert!(covers("/", "/a"));
        assert!(covers("/photos", "/photos"));
        assert!(covers("/photos", "/photos/a.jpg"));
        assert!(!covers("/photo", "/photos/a.jpg"));
        assert!(!covers("/photos/a", "/photos"));
    }

    #[test]
    fn relative_and_join_are_inverse() {
        assert_eq!(relative("/", "/a/b"), "a/b");
        assert_eq!(relative("/a", "/a/b"), "b");
        assert_eq!(relative("/a", "/a"), "");
        assert_eq!(join("/", "a/b"), "/a/b");
        assert_eq!(join("/a", "b"), "/a/b");
    }

    proptest! {
        #[test]
        fn a_normalised_path_is_stable_and_plain(path in "(/[a-z.]{0,3}){0,5}/?") {
            if let Ok(normal) = normalise(&path) {
                prop_assert_eq!(normalise(&normal), Ok(normal.clone()));
                prop_assert!(normal == "/" || !normal.ends_with('/'));
                for c in normal.split('/').skip(1).filter(|_| normal != "/") {
                    prop_assert!(!c.is_empty() && !c.starts_with('.'));
                }
                let rel = relative("/", &normal);
                prop_assert_eq!(join("/", rel), normal.clone());
            }
        }
    }
}

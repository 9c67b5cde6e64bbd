//! FILEMQ's control commands, typed: `PUBLISH` and `UNPUBLISH` from the
//! control endpoint (`zbroker publish|unpublish`, parsed here once from
//! their words), and the config file's mounts that SIGHUP's reload hands
//! over as values (never words, so a directory that is not UTF-8 stays
//! what it is). What they fail with is [`MountError`].

use super::mounts::{shown, Origin, SaveError, MAX_RUNTIME};
use super::{Filemq, Mount};
use crate::{Action, Success};
use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;
use std::time::Instant;
use zbroker_proto::escape::unescape;
use zbroker_proto::vpath;

/// A control command FILEMQ carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `PUBLISH DIRECTORY ALIAS` (`DIRECTORY` escaped): one more run-time
    /// mount, kept in the state directory until unpublished.
    Publish { dir: PathBuf, alias: String },
    /// `UNPUBLISH ALIAS`: a run-time mount no longer published.
    Unpublish { alias: String },
    /// The mounts of a re-read config file (SIGHUP): they replace the
    /// config's mounts; run-time mounts stay, and an alias one of them
    /// holds is refused (the rest of the list is still applied).
    ReplaceMounts(Vec<ConfigMount>),
}

/// A mount the config file lists: an absolute directory and its alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMount {
    pub dir: PathBuf,
    pub alias: String,
}

/// Why the words of a control command are not a FILEMQ command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("usage: PUBLISH DIRECTORY ALIAS")]
    PublishUsage,
    #[error("usage: UNPUBLISH ALIAS")]
    UnpublishUsage,
    #[error("{0:?} is not an escaped directory name")]
    NotEscaped(String),
}

/// The command the words (verb first, no token) say, if the verb is
/// FILEMQ's.
pub fn parse(words: &[String]) -> Option<Result<Command, ParseError>> {
    let (verb, args) = words.split_first()?;
    Some(match (verb.as_str(), args) {
        ("PUBLISH", [dir, alias]) => match unescape(dir) {
            Some(bytes) => Ok(Command::Publish {
                dir: PathBuf::from(std::ffi::OsString::from_vec(bytes)),
                alias: alias.clone(),
            }),
            None => Err(ParseError::NotEscaped(dir.clone())),
        },
        ("PUBLISH", _) => Err(ParseError::PublishUsage),
        ("UNPUBLISH", [alias]) => Ok(Command::Unpublish { alias: alias.clone() }),
        ("UNPUBLISH", _) => Err(ParseError::UnpublishUsage),
        _ => return None,
    })
}

/// Why a mount could not be published or unpublished.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("alias {0:?} must be an absolute virtual path such as / or /photos")]
    BadAlias(String),
    #[error("{} is not an absolute path", shown(.0))]
    NotAbsolute(PathBuf),
    #[error("{alias} is already published from {}", shown(.root))]
    AliasTaken { alias: String, root: PathBuf },
    #[error("already {MAX_RUNTIME} run-time mounts, the most a broker keeps")]
    TooManyRuntime,
    #[error("nothing is published as {0}")]
    UnknownAlias(String),
    #[error(
        "{alias} ({}) comes from the command line or config file, not from `zbroker publish`: \
         remove it there, then reload (SIGHUP) or restart",
        shown(.root)
    )]
    NotRuntime { alias: String, root: PathBuf },
    /// The mounts file could not be saved, so the table stays as it was.
    #[error("{0}; nothing changed")]
    SaveFailed(#[source] SaveError),
    /// A reload applied, except for aliases that run-time mounts hold.
    #[error("{done}; not published: {}", list(.refused))]
    HeldAtRuntime { done: Replaced, refused: Vec<RuntimeHeld> },
}

/// A config mount refused because a run-time mount holds its alias.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{alias} ({}) is published at run time from {}: `zbroker unpublish` it first", shown(.dir), shown(.held))]
pub struct RuntimeHeld {
    pub alias: String,
    /// The config's directory.
    pub dir: PathBuf,
    /// The run-time mount's.
    pub held: PathBuf,
}

fn list(refused: &[RuntimeHeld]) -> String {
    refused.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// What replacing the config's mounts did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("mounts: {published} published, {moved} moved, {unpublished} unpublished, {total} in all")]
pub struct Replaced {
    pub published: usize,
    pub moved: usize,
    pub unpublished: usize,
    /// Mounts published now, run-time ones included.
    pub total: usize,
}

impl Filemq {
    /// [`Command::ReplaceMounts`]: publish what is new, unpublish what is
    /// no longer listed, keep the rest.
    pub(super) fn replace_mounts(
        &mut self,
        wanted: Vec<ConfigMount>,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<Success, MountError> {
        let mut refused = Vec::new();
        let mut kept = Vec::new();
        for ConfigMount { dir, alias } in wanted {
            let alias = vpath::normalise(&alias).map_err(|_| MountError::BadAlias(alias.clone()))?;
            match self.runtime_holder(&alias) {
                Some(held) => refused.push(RuntimeHeld { alias, dir, held }),
                None => kept.push((dir, alias)),
            }
        }
        let wanted = kept;
        let config = |m: &&Mount| m.origin == Origin::Config;
        // An alias that stays but moves to another directory keeps its
        // mount: the next scan's diff says what changed, and subscribers
        // are not sent a delete for every file first.
        let mut moved = 0;
        for (root, alias) in &wanted {
            let Some(id) = self
                .mounts
                .iter()
                .find(|(_, m)| config(m) && m.alias == *alias && m.root != *root)
                .map(|(id, _)| *id)
            else {
                continue;
            };
            self.reroot(id, root.clone(), now, out);
            moved += 1;
        }
        let stale: Vec<String> = self
            .mounts
            .values()
            .filter(config)
            .filter(|m| !wanted.iter().any(|(root, alias)| *root == m.root && *alias == m.alias))
            .map(|m| m.alias.clone())
            .collect();
        for alias in &stale {
            self.unpublish(alias, out)?;
        }
        let mut published = 0;
        for (root, alias) in wanted {
            if !self.mounts.values().any(|m| m.root == root && m.alias == alias) {
                self.publish(root, &alias, now, out)?;
                published += 1;
            }
        }
        let done = Replaced { published, moved, unpublished: stale.len(), total: self.mounts.len() };
        if !refused.is_empty() {
            return Err(MountError::HeldAtRuntime { done, refused });
        }
        let details = serde_json::json!({
            "published": done.published,
            "moved": done.moved,
            "unpublished": done.unpublished,
            "mounts": done.total,
        });
        Ok(Success::text(done.to_string()).with_details(details))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &[&str]) -> Vec<String> {
        text.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn words_parse_into_commands() {
        assert_eq!(
            parse(&words(&["PUBLISH", "/srv/caf\\xe9", "/cafe"])),
            Some(Ok(Command::Publish {
                dir: PathBuf::from(std::ffi::OsString::from_vec(b"/srv/caf\xe9".to_vec())),
                alias: "/cafe".into()
            }))
        );
        assert_eq!(
            parse(&words(&["UNPUBLISH", "/cafe"])),
            Some(Ok(Command::Unpublish { alias: "/cafe".into() }))
        );
        assert_eq!(parse(&words(&["STATUS"])), None, "not FILEMQ's");
        assert_eq!(parse(&words(&["MOUNTS", "/srv=/"])), None, "SIGHUP's mounts are no words");
        assert_eq!(parse(&[]), None);
    }

    #[test]
    fn bad_words_are_a_usage_error() {
        let bad = |text: &[&str]| parse(&words(text)).expect("FILEMQ's verb").unwrap_err();
        for publish in [&["PUBLISH"][..], &["PUBLISH", "/srv"], &["PUBLISH", "/srv", "/a", "/b"]] {
            assert_eq!(bad(publish), ParseError::PublishUsage);
            assert_eq!(bad(publish).to_string(), "usage: PUBLISH DIRECTORY ALIAS");
        }
        for unpublish in [&["UNPUBLISH"][..], &["UNPUBLISH", "/a", "/b"]] {
            assert_eq!(bad(unpublish).to_string(), "usage: UNPUBLISH ALIAS");
        }
        assert_eq!(bad(&["PUBLISH", "/srv/\\q", "/a"]), ParseError::NotEscaped("/srv/\\q".into()));
        assert_eq!(
            bad(&["PUBLISH", "/srv/\\x4", "/a"]).to_string(),
            "\"/srv/\\\\x4\" is not an escaped directory name"
        );
    }
}

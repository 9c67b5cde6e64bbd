//! Paths a subscriber leaves out (`filemq subscribe --exclude`), as
//! gitignore-style patterns matched against paths relative to the
//! subscription. A pure function of the patterns and the path: the
//! broker filters with it (so excluded files never cost credit) and the
//! subscriber with the same code (so `--delete` never touches them).
//!
//! - `*` matches any run of characters but `/`, `?` one character but `/`;
//!   `\` makes the next character literal; `[` is a plain character.
//! - `**` as a whole component matches any number of directories:
//!   `**/x` (x at any depth), `a/**` (everything inside `a`), `a/**/b`.
//! - A pattern with a `/` at its start or in its middle is anchored at the
//!   subscription's root (a leading `/` only anchors); without one it
//!   matches a name at any depth.
//! - A trailing `/` matches directories only.
//! - `!pattern` takes back an earlier exclusion; the last pattern that
//!   matches decides. As in git, nothing below an excluded directory can
//!   be taken back.
//! - What is excluded is excluded whole: a directory's contents with it.
//!
//! A peer sends these, so they are bounded: [`MAX_PATTERNS`] patterns of
//! at most [`MAX_PATTERN_BYTES`] bytes each. Matching one path costs at
//! most the patterns' length times the path's, per directory above it;
//! [`Filter`] remembers the directories of the previous path, so sorted
//! paths cost their own components only.

/// Most patterns one subscription may carry.
pub const MAX_PATTERNS: usize = 64;
/// Longest pattern, in bytes.
pub const MAX_PATTERN_BYTES: usize = 256;

/// Why a set of patterns is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("more than {MAX_PATTERNS} exclude patterns")]
    TooMany,
    #[error("exclude pattern {0:?} is longer than {MAX_PATTERN_BYTES} bytes")]
    TooLong(String),
    #[error("exclude pattern {0:?} matches nothing (it is empty, or only '!' or '/')")]
    Empty(String),
    #[error("exclude pattern {0:?} holds a newline, NUL or other control character")]
    Control(String),
    #[error("exclude patterns must be UTF-8")]
    NotUtf8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`
    One,
    /// `*`
    Run,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of components, none included.
    AnyDirs,
    /// A name without wildcards: compared, not matched.
    Literal(String),
    Glob(Vec<Token>),
}

impl Segment {
    fn matches(&self, name: &str) -> bool {
        match self {
            Segment::AnyDirs => true,
            Segment::Literal(literal) => literal == name,
            Segment::Glob(tokens) => glob(tokens, name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    negate: bool,
    dir_only: bool,
    /// Anchored patterns match the whole path; the others its last
    /// component (a single glob).
    anchored: bool,
    segments: Vec<Segment>,
}

/// A set of exclude patterns, checked and compiled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Excludes {
    patterns: Vec<String>,
    rules: Vec<Rule>,
}

impl Excludes {
    /// Compiles `patterns` (as given on the command line).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Excludes, PatternError> {
        if patterns.len() > MAX_PATTERNS {
            return Err(PatternError::TooMany);
        }
        let mut excludes = Excludes::default();
        for pattern in patterns {
            let pattern = pattern.as_ref();
            excludes.rules.push(compile(pattern)?);
            excludes.patterns.push(pattern.to_string());
        }
        Ok(excludes)
    }

    /// Reads the ICANHAZ option: one pattern a line.
    pub fn from_option(value: &[u8]) -> Result<Excludes, PatternError> {
        let text = std::str::from_utf8(value).map_err(|_| PatternError::NotUtf8)?;
        // Counted before anything is compiled: a peer chooses the text.
        if text.split('\n').count() > MAX_PATTERNS {
            return Err(PatternError::TooMany);
        }
        Excludes::new(&text.split('\n').collect::<Vec<_>>())
    }

    /// The ICANHAZ option's value: the patterns, one a line.
    pub fn to_option(&self) -> String {
        self.patterns.join("\n")
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The patterns as given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Is `rel` (relative to the subscription, `/`-separated; a directory
    /// if `is_dir`) excluded, itself or by a directory above it?
    pub fn excludes(&self, rel: &str, is_dir: bool) -> bool {
        self.filter().excludes(rel, is_dir)
    }

    /// A checker that remembers the directories of the last path it saw.
    pub fn filter(&self) -> Filter<'_> {
        Filter { excludes: self, last: String::new(), above: Vec::new() }
    }

    /// What the last matching rule says of `rel` itself: `Some(true)`
    /// excluded, `Some(false)` taken back, `None` no rule matches.
    fn verdict(&self, parts: &[&str], is_dir: bool) -> Option<bool> {
        self.rules.iter().rev().find(|rule| rule.matches(parts, is_dir)).map(|rule| !rule.negate)
    }
}

/// Checks paths one after the other; the verdicts of the directories above
/// the previous path are reused for the next (sorted paths share most).
pub struct Filter<'a> {
    excludes: &'a Excludes,
    last: String,
    /// Per directory above `last`, from the top: excluded (itself or by
    /// one above it).
    above: Vec<bool>,
}

impl Filter<'_> {
    /// See [`Excludes::excludes`].
    pub fn excludes(&mut self, rel: &str, is_dir: bool) -> bool {
        if self.excludes.rules.is_empty() {
            return false;
        }
        let parts: Vec<&str> = rel.split('/').collect();
        let dirs = parts.len() - 1;
        let common = self
            .last
            .split('/')
            .take(self.above.len())
            .zip(&parts[..dirs])
            .take_while(|(a, b)| a == *b)
            .count();
        self.above.truncate(common);
        while self.above.len() < dirs {
            let depth = self.above.len();
            let excluded = self.above.last().copied().unwrap_or(false)
                || self.excludes.verdict(&parts[..=depth], true) == Some(true);
            self.above.push(excluded);
        }
        self.last.clear();
        self.last.push_str(rel);
        self.above.last().copied().unwrap_or(false) || self.excludes.verdict(&parts, is_dir) == Some(true)
    }
}

fn compile(pattern: &str) -> Result<Rule, PatternError> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(PatternError::TooLong(pattern.chars().take(40).collect()));
    }
    if pattern.chars().any(char::is_control) {
        return Err(PatternError::Control(pattern.to_string()));
    }
    let (negate, body) = match pattern.strip_prefix('!') {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    // A trailing `/` (unless escaped) means directories only.
    let (dir_only, body) = match body.strip_suffix('/') {
        Some(rest) if !rest.ends_with('\\') || rest.ends_with("\\\\") => (true, rest),
        _ => (false, body),
    };
    let anchored = body.contains('/');
    let body = body.strip_prefix('/').unwrap_or(body);
    if body.is_empty() {
        return Err(PatternError::Empty(pattern.to_string()));
    }
    let mut segments = Vec::new();
    for part in body.split('/') {
        if part == "**" {
            if segments.last() != Some(&Segment::AnyDirs) {
                segments.push(Segment::AnyDirs);
            }
            continue;
        }
        if part.is_empty() {
            // `a//b` is `a/b`, as paths have no empty components.
            continue;
        }
        let mut tokens = Vec::new();
        let mut chars = part.chars();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '*' if tokens.last() == Some(&Token::Run) => continue,
                '*' => Token::Run,
                '?' => Token::One,
                '\\' => Token::Literal(chars.next().unwrap_or('\\')),
                c => Token::Literal(c),
            });
        }
        let literal: Option<String> =
            tokens.iter().map(|t| if let Token::Literal(c) = t { Some(*c) } else { None }).collect();
        segments.push(match literal {
            Some(literal) => Segment::Literal(literal),
            None => Segment::Glob(tokens),
        });
    }
    if segments.is_empty() {
        return Err(PatternError::Empty(pattern.to_string()));
    }
    if !anchored && segments == [Segment::AnyDirs] {
        // `**` alone is a name at any depth: anything.
        segments = vec![Segment::Glob(vec![Token::Run])];
    }
    Ok(Rule { negate, dir_only, anchored, segments })
}

impl Rule {
    fn matches(&self, parts: &[&str], is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        if !self.anchored {
            // One name, against the last component (ancestors are checked
            // as directories of their own).
            return match (&self.segments[..], parts.last()) {
                ([segment], Some(name)) => segment.matches(name),
                _ => false,
            };
        }
        if parts.len() < 128 {
            self.reach_bits(parts)
        } else {
            self.reach_vec(parts)
        }
    }

    /// Which numbers of leading components the segments so far can
    /// consume, walked segment by segment, as the bits of a `u128` (no
    /// allocation: this runs for every published file a RESYNC queues).
    fn reach_bits(&self, parts: &[&str]) -> bool {
        let last = self.segments.len() - 1;
        let mut reach: u128 = 1;
        for (index, segment) in self.segments.iter().enumerate() {
            reach = match segment {
                Segment::AnyDirs => {
                    // A trailing `**` is what is inside: one component at
                    // least (`a/**` does not match `a`).
                    let first = reach.trailing_zeros() as usize + usize::from(index == last);
                    let all =
                        if parts.len() + 1 >= 128 { u128::MAX } else { (1u128 << (parts.len() + 1)) - 1 };
                    if reach == 0 || first > parts.len() {
                        0
                    } else {
                        all & !((1u128 << first) - 1)
                    }
                }
                glob => {
                    let mut next = 0;
                    for (i, part) in parts.iter().enumerate() {
                        if reach & (1 << i) != 0 && glob.matches(part) {
                            next |= 1 << (i + 1);
                        }
                    }
                    next
                }
            };
            if reach == 0 {
                return false;
            }
        }
        reach & (1 << parts.len()) != 0
    }

    /// `reach_bits` for paths of 128 components or more.
    fn reach_vec(&self, parts: &[&str]) -> bool {
        let mut reach = vec![false; parts.len() + 1];
        reach[0] = true;
        let last = self.segments.len() - 1;
        for (index, segment) in self.segments.iter().enumerate() {
            let mut next = vec![false; parts.len() + 1];
            match segment {
                Segment::AnyDirs => {
                    if let Some(first) = reach.iter().position(|&r| r) {
                        let from = if index == last { first + 1 } else { first };
                        next.iter_mut().skip(from).for_each(|n| *n = true);
                    }
                }
                glob => {
                    for (i, part) in parts.iter().enumerate() {
                        if reach[i] && glob.matches(part) {
                            next[i + 1] = true;
                        }
                    }
                }
            }
            reach = next;
        }
        reach[parts.len()]
    }
}

/// Does one component match a glob? Greedy with one backtracking point,
/// as `*` cannot cross a `/`: at most the glob's length times the name's.
/// Walks the name by byte offsets (`?` takes one character), allocating
/// nothing.
fn glob(tokens: &[Token], name: &str) -> bool {
    let char_at = |at: usize| name[at..].chars().next();
    let (mut t, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while let Some(c) = char_at(n) {
        match tokens.get(t) {
            Some(Token::Run) => {
                star = Some((t, n));
                t += 1;
            }
            Some(Token::One) => {
                t += 1;
                n += c.len_utf8();
            }
            Some(Token::Literal(l)) if *l == c => {
                t += 1;
                n += c.len_utf8();
            }
            _ => match star {
                Some((st, sn)) => {
                    let skipped = sn + char_at(sn).map_or(1, char::len_utf8);
                    t = st + 1;
                    n = skipped;
                    star = Some((st, skipped));
                }
                None => return false,
            },
        }
    }
    tokens[t..].iter().all(|token| *token == Token::Run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ex(patterns: &[&str]) -> Excludes {
        Excludes::new(patterns).unwrap()
    }

    #[test]
    fn names_match_at_any_depth() {
        let e = ex(&["*.tmp", "cache"]);
        assert!(e.excludes("a.tmp", false));
        assert!(e.excludes("x/y/b.tmp", false));
        assert!(!e.excludes("a.tmpx", false));
        assert!(e.excludes("cache", true));
        assert!(e.excludes("x/cache/f", false), "inside an excluded directory");
        assert!(!e.excludes("x/caches/f", false));
    }

    #[test]
    fn anchored_and_directory_patterns() {
        let e = ex(&["/build", "docs/*.pdf", "logs/"]);
        assert!(e.excludes("build", true));
        assert!(e.excludes("build/out.o", false));
        assert!(!e.excludes("src/build", true), "a leading / anchors");
        assert!(e.excludes("docs/a.pdf", false));
        assert!(!e.excludes("x/docs/a.pdf", false), "a middle / anchors");
        assert!(!e.excludes("docs/sub/a.pdf", false), "* does not cross /");
        assert!(e.excludes("logs", true));
        assert!(e.excludes("a/logs/today", false));
        assert!(!e.excludes("a/logs", false), "a file named logs stays");
    }

    #[test]
    fn double_stars() {
        let e = ex(&["**/tmp", "a/**/z", "out/**"]);
        assert!(e.excludes("tmp", false));
        assert!(e.excludes("p/q/tmp", false));
        assert!(e.excludes("a/z", false));
        assert!(e.excludes("a/b/c/z", false));
        assert!(!e.excludes("b/a/z", false));
        assert!(e.excludes("out/x", false));
        assert!(e.excludes("out/x/y", false));
        assert!(!e.excludes("out", true), "out/** is what is inside out");
    }

    #[test]
    fn negation_takes_back_but_not_below_an_excluded_directory() {
        let e = ex(&["*.log", "!keep.log", "secret/", "!secret/ok"]);
        assert!(e.excludes("a.log", false));
        assert!(!e.excludes("keep.log", false));
        assert!(!e.excludes("d/keep.log", false));
        assert!(e.excludes("secret/ok", false), "cannot take back below an excluded directory");
    }

    #[test]
    fn question_marks_and_escapes() {
        let e = ex(&["?.c", "\\*star", "a\\?"]);
        assert!(e.excludes("x.c", false));
        assert!(!e.excludes("xy.c", false));
        assert!(e.excludes("*star", false));
        assert!(!e.excludes("Xstar", false));
        assert!(e.excludes("a?", false));
        assert!(!e.excludes("ab", false));
    }

    #[test]
    fn long_paths_and_wide_characters() {
        let long = format!("{}z", "a/".repeat(140));
        let e = ex(&["**/z"]);
        assert!(e.excludes(&long, false));
        assert!(ex(&["a/**"]).excludes(&long, false));
        assert!(!ex(&["/a/b"]).excludes(&long, false));
        assert!(ex(&["/a/a/**/z"]).excludes(&long, false));
        assert!(!ex(&["/a/a/**/y"]).excludes(&long, false));
        let medium = format!("{}z", "a/".repeat(126));
        assert!(ex(&["/a/**/z"]).excludes(&medium, false), "127 components: the last bits");
        assert!(ex(&["?.c", "*é*"]).excludes("é.c", false));
        assert!(ex(&["*é*"]).excludes("cafés", false));
        assert!(!ex(&["??.c"]).excludes("é.c", false), "? is one character, not one byte");
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert_eq!(Excludes::new(&[""]), Err(PatternError::Empty(String::new())));
        assert!(matches!(Excludes::new(&["!"]), Err(PatternError::Empty(_))));
        assert!(matches!(Excludes::new(&["/"]), Err(PatternError::Empty(_))));
        assert!(matches!(Excludes::new(&["a\nb"]), Err(PatternError::Control(_))));
        assert!(matches!(Excludes::new(&["x".repeat(MAX_PATTERN_BYTES + 1)]), Err(PatternError::TooLong(_))));
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("p{i}")).collect();
        assert_eq!(Excludes::new(&many), Err(PatternError::TooMany));
        let option = vec!["p"; MAX_PATTERNS + 1].join("\n");
        assert_eq!(Excludes::from_option(option.as_bytes()), Err(PatternError::TooMany));
        assert_eq!(Excludes::from_option(b"\xff"), Err(PatternError::NotUtf8));
        let e = ex(&["a/*", "!b"]);
        assert_eq!(Excludes::from_option(e.to_option().as_bytes()), Ok(e));
    }

    /// A reference: the gitignore rules written out plainly, with a
    /// backtracking matcher.
    fn reference(patterns: &[String], rel: &str, is_dir: bool) -> bool {
        fn seg_match(p: &[char], s: &[char]) -> bool {
            match (p.first(), s.first()) {
                (None, None) => true,
                (Some('*'), _) => seg_match(&p[1..], s) || (!s.is_empty() && seg_match(p, &s[1..])),
                (Some('?'), Some(_)) => seg_match(&p[1..], &s[1..]),
                (Some(a), Some(b)) if a == b => seg_match(&p[1..], &s[1..]),
                _ => false,
            }
        }
        fn path_match(p: &[&str], s: &[&str]) -> bool {
            match (p.first(), s.first()) {
                (None, None) => true,
                // A trailing `**` is one component or more, another zero or more.
                (Some(&"**"), _) if p.len() == 1 => !s.is_empty(),
                (Some(&"**"), _) => path_match(&p[1..], s) || (!s.is_empty() && path_match(p, &s[1..])),
                (Some(a), Some(b)) => {
                    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
                    seg_match(&a, &b) && path_match(&p[1..], &s[1..])
                }
                _ => false,
            }
        }
        let one = |parts: &[&str], is_dir: bool| -> Option<bool> {
            patterns.iter().rev().find_map(|pattern| {
                let (negate, body) =
                    pattern.strip_prefix('!').map_or((false, pattern.as_str()), |b| (true, b));
                let (dir_only, body) = body.strip_suffix('/').map_or((false, body), |b| (true, b));
                if dir_only && !is_dir {
                    return None;
                }
                let hit = if body.contains('/') {
                    let body = body.strip_prefix('/').unwrap_or(body);
                    let p: Vec<&str> = body.split('/').filter(|s| !s.is_empty()).collect();
                    path_match(&p, parts)
                } else {
                    let (a, b): (Vec<char>, Vec<char>) =
                        (body.chars().collect(), parts[parts.len() - 1].chars().collect());
                    seg_match(&a, &b)
                };
                hit.then_some(!negate)
            })
        };
        let parts: Vec<&str> = rel.split('/').collect();
        (1..parts.len()).any(|end| one(&parts[..end], true) == Some(true))
            || one(&parts, is_dir) == Some(true)
    }

    fn pattern() -> impl Strategy<Value = String> {
        let piece =
            prop_oneof![Just("a"), Just("b"), Just("*"), Just("?"), Just("**"), Just("/"), Just("ab")];
        (any::<bool>(), proptest::collection::vec(piece, 1..6), any::<bool>()).prop_filter_map(
            "a pattern",
            |(negate, pieces, trailing)| {
                let mut p = pieces.concat();
                if trailing {
                    p.push('/');
                }
                if negate {
                    p.insert(0, '!');
                }
                Excludes::new(&[&p]).ok().map(|_| p)
            },
        )
    }

    proptest! {
        /// The compiled matcher agrees with the plain reference, and the
        /// filter's memory of directories never changes a verdict.
        #[test]
        fn agrees_with_the_reference(
            patterns in proptest::collection::vec(pattern(), 0..4),
            paths in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("ab"), Just("ba"), Just("aa")], 1..5),
                1..6,
            ),
            dirs in proptest::collection::vec(any::<bool>(), 6),
        ) {
            let e = Excludes::new(&patterns).unwrap();
            let mut sorted: Vec<String> = paths.iter().map(|p| p.join("/")).collect();
            sorted.sort();
            let mut filter = e.filter();
            for (i, rel) in sorted.iter().enumerate() {
                let expect = reference(&patterns, rel, dirs[i]);
                prop_assert_eq!(e.excludes(rel, dirs[i]), expect, "{:?} {} dir={}", patterns, rel, dirs[i]);
                prop_assert_eq!(filter.excludes(rel, dirs[i]), expect);
            }
        }

        /// Any bytes as an option: refused or compiled, never a panic, and
        /// matching stays quick.
        #[test]
        fn any_option_is_safe(value in proptest::collection::vec(any::<u8>(), 0..600), rel in "[a-z*?/]{1,40}") {
            if let Ok(e) = Excludes::from_option(&value) {
                let _ = e.excludes(rel.trim_matches('/'), false);
            }
        }
    }
}

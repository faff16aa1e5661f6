//! Routing by event name: subscription patterns with AMQP topic semantics, the same rules
//! RabbitMQ applies to the bindings of each plugin's queue.

use std::fmt;

/// A subscription pattern: words separated by `.`, where `*` matches exactly one word and
/// `#` matches zero or more words.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(into = "String")]
pub struct Pattern {
    text: String,
    words: Vec<Word>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Word {
    Literal(String),
    One,
    Many,
}

/// Why a pattern was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PatternError {
    #[error("pattern is empty")]
    Empty,
    #[error("pattern {0:?} has an empty word (two dots in a row, or a leading or trailing dot)")]
    EmptyWord(String),
    #[error("pattern {0:?} mixes `*` or `#` with other characters in one word")]
    MixedWildcard(String),
    #[error("pattern {0:?} is longer than 255 bytes, the AMQP routing key limit")]
    TooLong(String),
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.len() > 255 {
            return Err(PatternError::TooLong(text.into()));
        }
        let words = text
            .split('.')
            .map(|w| match w {
                "" => Err(PatternError::EmptyWord(text.into())),
                "*" => Ok(Word::One),
                "#" => Ok(Word::Many),
                w if w.contains(['*', '#']) => Err(PatternError::MixedWildcard(text.into())),
                w => Ok(Word::Literal(w.into())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Pattern { text: text.into(), words })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether an event name matches this pattern.
    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<&str> = name.split('.').collect();
        matches_words(&self.words, &name)
    }
}

fn matches_words(pattern: &[Word], name: &[&str]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((Word::Many, rest)) => (0..=name.len()).any(|skip| matches_words(rest, &name[skip..])),
        Some((Word::One, rest)) => !name.is_empty() && matches_words(rest, &name[1..]),
        Some((Word::Literal(w), rest)) => name.first() == Some(&w.as_str()) && matches_words(rest, &name[1..]),
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<Pattern> for String {
    fn from(p: Pattern) -> String {
        p.text
    }
}

impl<'de> serde::Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Pattern::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A set of subscriptions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Subscriptions(pub Vec<Pattern>);

impl Subscriptions {
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, name: &str) -> bool {
        Pattern::parse(pattern).unwrap().matches(name)
    }

    #[test]
    fn literal_patterns_match_exactly() {
        assert!(m("post.created", "post.created"));
        assert!(!m("post.created", "post.created.v2"));
        assert!(!m("post.created", "post"));
        assert!(m("auth.tokenGenerated", "auth.tokenGenerated"));
        assert!(!m("auth.tokenGenerated", "auth.tokengenerated"), "case-sensitive like AMQP");
    }

    #[test]
    fn star_matches_exactly_one_word() {
        assert!(m("order.*", "order.created"));
        assert!(!m("order.*", "order"));
        assert!(!m("order.*", "order.item.added"));
        assert!(m("*.created", "post.created"));
        assert!(m("*", "single"));
        assert!(!m("*", "two.words"));
    }

    #[test]
    fn hash_matches_zero_or_more_words() {
        assert!(m("user.#", "user"));
        assert!(m("user.#", "user.updated"));
        assert!(m("user.#", "user.profile.updated"));
        assert!(!m("user.#", "users.updated"));
        assert!(m("#", "anything.at.all"));
        assert!(m("#.deleted", "user.deleted"));
        assert!(m("#.deleted", "deleted"));
        assert!(m("a.#.z", "a.z"));
        assert!(m("a.#.z", "a.b.c.z"));
        assert!(!m("a.#.z", "a.b.c"));
        assert!(m("#.*", "x"));
    }

    #[test]
    fn invalid_patterns_say_why() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert_eq!(Pattern::parse("a..b"), Err(PatternError::EmptyWord("a..b".into())));
        assert_eq!(Pattern::parse("a.b*"), Err(PatternError::MixedWildcard("a.b*".into())));
        assert!(matches!(Pattern::parse(&"a".repeat(256)), Err(PatternError::TooLong(_))));
    }
}

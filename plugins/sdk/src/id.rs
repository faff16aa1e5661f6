//! Identifiers as producers send them: JSON strings from some services, numbers from others
//! (an auto-increment `userId: 7`). Both become the same text.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A non-empty identifier given as a JSON string or integer; kept and written as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(String);

impl Id {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Id {
    fn from(text: &str) -> Self {
        Id(text.into())
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdVisitor;

        impl Visitor<'_> for IdVisitor {
            type Value = Id;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-empty string or an integer id")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Id, E> {
                if v.is_empty() {
                    return Err(E::invalid_value(de::Unexpected::Str(""), &self));
                }
                Ok(Id(v.into()))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Id, E> {
                Ok(Id(v.to_string()))
            }
        }

        d.deserialize_any(IdVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::Id;

    #[test]
    fn strings_and_integers_are_the_same_text_and_empty_is_refused() {
        assert_eq!(serde_json::from_str::<Id>("\"u7\"").unwrap().as_str(), "u7");
        assert_eq!(serde_json::from_str::<Id>("7").unwrap(), Id::from("7"));
        assert_eq!(serde_json::to_string(&Id::from("7")).unwrap(), "\"7\"");
        for bad in ["\"\"", "1.5", "null", "{}"] {
            assert!(serde_json::from_str::<Id>(bad).is_err(), "{bad}");
        }
    }
}

//! What the seed flows' plugins share. Each payload type here is the contract between the
//! plugin that publishes an event and the plugins that consume it, so both sides decode the
//! same shape.

pub mod email;
pub mod follows;
pub mod orders;
pub mod users;

/// A store key made of several ids, `:`-separated; `%` and `:` inside an id are escaped, so
/// two different lists of ids never make the same key.
pub fn compound_key(parts: &[&str]) -> String {
    parts.iter().map(|p| p.replace('%', "%25").replace(':', "%3A")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
mod tests {
    use super::compound_key;

    #[test]
    fn ids_with_separators_make_distinct_keys() {
        assert_eq!(compound_key(&["a", "b"]), "a:b");
        assert_ne!(compound_key(&["a:b", "c"]), compound_key(&["a", "b:c"]));
        assert_ne!(compound_key(&["a%3A", "b"]), compound_key(&["a:", "b"]));
    }
}

//! An envelope's attributes: a few name → value strings, kept sorted.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Index;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smol_str::SmolStr;

/// Flat string facts about an event (ids, principal, keywords) that sinks
/// turn into headers, routing keys and topic names.
///
/// A sorted vector rather than a map: an envelope has about six, their
/// names and most values are short (kept inline, no allocation), long
/// values are shared when cloned, and an encoder that adds them in order
/// appends without searching. Iteration is by name, as a
/// `BTreeMap`'s; inserting a name again replaces its value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Attributes(Vec<(SmolStr, SmolStr)>);

impl Attributes {
    /// Room for `n` attributes.
    pub fn with_capacity(n: usize) -> Self {
        Attributes(Vec::with_capacity(n))
    }

    /// Sets `name` to `value`, returning the value it replaces.
    pub fn insert(&mut self, name: SmolStr, value: SmolStr) -> Option<SmolStr> {
        // Appending in order (what encoders do) needs no search.
        if self.0.last().is_none_or(|(last, _)| *last < name) {
            self.0.push((name, value));
            return None;
        }
        match self.0.binary_search_by(|(n, _)| n.as_str().cmp(&name)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (name, value));
                None
            }
        }
    }

    /// Appends `name`, which must sort after every name already set (what
    /// an encoder adding them in order knows): no comparison in release
    /// builds, a check in debug ones.
    pub fn push_in_order(&mut self, name: SmolStr, value: SmolStr) {
        debug_assert!(
            self.0.last().is_none_or(|(last, _)| *last < name),
            "attribute `{name}` out of order"
        );
        self.0.push((name, value));
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&SmolStr> {
        self.0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Whether `name` is set.
    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Name and value pairs, by name.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&str, &SmolStr)> + ExactSizeIterator {
        self.0.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// None at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes them all.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

impl Index<&str> for Attributes {
    type Output = SmolStr;

    /// Panics when `name` is not set, as a map's index does.
    fn index(&self, name: &str) -> &SmolStr {
        match self.get(name) {
            Some(v) => v,
            None => panic!("no attribute `{name}`"),
        }
    }
}

impl<'a> IntoIterator for &'a Attributes {
    type Item = (&'a str, &'a SmolStr);
    type IntoIter = Box<dyn Iterator<Item = Self::Item> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl<N: Into<SmolStr>, V: Into<SmolStr>> FromIterator<(N, V)> for Attributes {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut out = Attributes::default();
        for (n, v) in iter {
            out.insert(n.into(), v.into());
        }
        out
    }
}

impl<N: Into<SmolStr>, V: Into<SmolStr>, const L: usize> From<[(N, V); L]> for Attributes {
    fn from(pairs: [(N, V); L]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Attributes {
    fn from(map: BTreeMap<String, String>) -> Self {
        // Already sorted and unique.
        Attributes(map.into_iter().map(|(n, v)| (n.into(), v.into())).collect())
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Attributes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Attributes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::<String, String>::deserialize(deserializer).map(Attributes::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_names_sorted_and_unique_as_a_map_does() {
        let mut a = Attributes::default();
        let mut m = BTreeMap::new();
        let mut x: u64 = 7;
        for i in 0..500 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let name = format!("k{}", (x >> 33) % 40);
            let value = i.to_string();
            assert_eq!(
                a.insert(name.clone().into(), value.clone().into()),
                m.insert(name.clone(), value).map(SmolStr::from)
            );
            assert_eq!(
                a.get(&name).map(SmolStr::as_str),
                m.get(&name).map(String::as_str)
            );
        }
        let pairs: Vec<_> = a
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let expected: Vec<_> = m.clone().into_iter().collect();
        assert_eq!(pairs, expected);
        assert_eq!(a, Attributes::from(m));
        assert!(!a.contains_key("absent"));
    }

    #[test]
    fn json_is_a_map_by_name() {
        let a = Attributes::from([("b", "2"), ("a", "1")]);
        let text = serde_json::to_string(&a).unwrap();
        assert_eq!(text, r#"{"a":"1","b":"2"}"#);
        let back: Attributes = serde_json::from_str(&text).unwrap();
        assert_eq!(back, a);
        assert_eq!(back["b"], "2");
    }
}

//! The `search` tool, simulated as the paper's API calls were: a look-up in a shipped key-value
//! corpus (`{"key": ..., "value": ...}` JSONL, e.g. `data/tools/search.jsonl`). A query matches
//! the key with the same words (case and punctuation aside), else the longest key whose words all
//! appear in it ("the capital of Veltria" finds "capital of Veltria"); otherwise there is no
//! result.

use std::collections::HashMap;
use std::path::Path;

use crate::ToolError;

#[derive(Debug, Clone, Default)]
pub struct SearchCorpus {
    /// (words of the key, value), in file order.
    entries: Vec<(Vec<String>, String)>,
    exact: HashMap<Vec<String>, usize>,
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

impl SearchCorpus {
    /// Reads the corpus; errors name the file and line.
    pub fn load(path: &Path) -> Result<Self, ToolError> {
        let mut corpus = Self::default();
        for line in llama_io::read_jsonl(path).map_err(|e| ToolError(e.to_string()))? {
            let line = line.map_err(|e| ToolError(e.to_string()))?;
            let field = |name: &str| match line.value.get(name) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
                _ => Err(ToolError(format!("{}: expected a non-empty string `{name}`", line.at))),
            };
            corpus.insert(&field("key")?, &field("value")?);
        }
        if corpus.entries.is_empty() {
            return Err(ToolError(format!("{}: the search corpus is empty", path.display())));
        }
        Ok(corpus)
    }

    /// Adds an entry (a later key with the same words replaces the value of an earlier one).
    pub fn insert(&mut self, key: &str, value: &str) {
        let key_words = words(key);
        match self.exact.get(&key_words) {
            Some(&i) => self.entries[i].1 = value.to_string(),
            None => {
                self.exact.insert(key_words.clone(), self.entries.len());
                self.entries.push((key_words, value.to_string()));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The value for `query`, or `None`.
    pub fn search(&self, query: &str) -> Option<&str> {
        let q = words(query);
        if let Some(&i) = self.exact.get(&q) {
            return Some(&self.entries[i].1);
        }
        let mut best: Option<(usize, usize)> = None;
        for (i, (key, _)) in self.entries.iter().enumerate() {
            if !key.is_empty() && key.iter().all(|w| q.contains(w)) && best.is_none_or(|(n, _)| key.len() > n) {
                best = Some((key.len(), i));
            }
        }
        best.map(|(_, i)| self.entries[i].1.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::SearchCorpus;

    #[test]
    fn exact_then_closest_key_then_nothing() {
        let mut c = SearchCorpus::default();
        c.insert("capital of Veltria", "Morvan");
        c.insert("capital of Dorsia", "Kalo");
        assert_eq!(c.search("capital of Veltria"), Some("Morvan"));
        assert_eq!(c.search("Capital of VELTRIA?"), Some("Morvan"), "case and punctuation aside");
        assert_eq!(c.search("the capital of Dorsia"), Some("Kalo"), "every word of the key");
        assert_eq!(c.search("population of Dorsia"), None, "two of the key's three words are not enough");
        assert_eq!(c.search("weather in Paris"), None);
        assert_eq!(c.search(""), None);
        c.insert("Capital of veltria", "Selra");
        assert_eq!((c.len(), c.search("capital of Veltria")), (2, Some("Selra")));
    }
}

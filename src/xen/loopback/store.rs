//! A small xenstore: a tree of string values with watches. Nodes are implicit:
//! a path exists when it has a value or a descendant.

#![forbid(unsafe_code)]

use super::super::WatchEvent;
use std::collections::BTreeMap;
use std::sync::mpsc::Sender;

struct Watch {
    path: String,
    token: String,
    owner: u32,
    to: Sender<WatchEvent>,
}

#[derive(Default)]
pub struct Tree {
    nodes: BTreeMap<String, String>,
    watches: Vec<Watch>,
}

fn is_at_or_below(path: &str, top: &str) -> bool {
    path == top
        || (path.starts_with(top) && (top.ends_with('/') || path.as_bytes().get(top.len()) == Some(&b'/')))
}

impl Tree {
    pub fn read(&self, path: &str) -> Option<String> {
        if let Some(v) = self.nodes.get(path) {
            return Some(v.clone());
        }
        self.has_children(path).then(String::new)
    }

    fn has_children(&self, path: &str) -> bool {
        let prefix = format!("{path}/");
        self.nodes.range(prefix.clone()..).next().is_some_and(|(k, _)| k.starts_with(&prefix))
    }

    pub fn directory(&self, path: &str) -> Vec<String> {
        let prefix = format!("{path}/");
        let mut out: Vec<String> = Vec::new();
        for (k, _) in self.nodes.range(prefix.clone()..) {
            let Some(rest) = k.strip_prefix(&prefix) else {
                break;
            };
            let child = rest.split('/').next().unwrap_or_default();
            if out.last().map(String::as_str) != Some(child) {
                out.push(child.to_string());
            }
        }
        out
    }

    pub fn write(&mut self, path: &str, value: &str) {
        self.nodes.insert(path.to_string(), value.to_string());
        self.fire(path);
    }

    pub fn rm(&mut self, path: &str) {
        let gone: Vec<String> = self.nodes.keys().filter(|k| is_at_or_below(k, path)).cloned().collect();
        for k in &gone {
            self.nodes.remove(k);
        }
        self.fire(path);
    }

    /// Registers a watch and fires it once, as xenstored does.
    pub fn watch(&mut self, owner: u32, path: &str, token: &str, to: Sender<WatchEvent>) {
        let _ = to.send(WatchEvent { path: path.to_string(), token: token.to_string() });
        self.watches.push(Watch { path: path.into(), token: token.into(), owner, to });
    }

    pub fn unwatch(&mut self, owner: u32, path: &str, token: &str) {
        self.watches.retain(|w| !(w.owner == owner && w.path == path && w.token == token));
    }

    pub fn drop_watches_of(&mut self, owner: u32) {
        self.watches.retain(|w| w.owner != owner);
    }

    /// A change at `path` fires watches on it, above it and (for removals of
    /// a subtree) below it.
    fn fire(&mut self, path: &str) {
        self.watches.retain(|w| {
            if is_at_or_below(path, &w.path) || is_at_or_below(&w.path, path) {
                let ev = WatchEvent { path: path.to_string(), token: w.token.clone() };
                return w.to.send(ev).is_ok();
            }
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn tree_reads_lists_and_removes() {
        let mut t = Tree::default();
        t.write("/a/b/c", "1");
        t.write("/a/b/d", "2");
        t.write("/a/bb", "3");
        assert_eq!(t.read("/a/b/c").as_deref(), Some("1"));
        assert_eq!(t.read("/a/b").as_deref(), Some(""));
        assert_eq!(t.read("/a/x"), None);
        assert_eq!(t.directory("/a"), vec!["b", "bb"]);
        assert_eq!(t.directory("/a/b"), vec!["c", "d"]);
        t.rm("/a/b");
        assert_eq!(t.directory("/a"), vec!["bb"]);
    }

    #[test]
    fn watches_fire_on_register_and_on_changes_below() {
        let mut t = Tree::default();
        let (tx, rx) = channel();
        t.watch(0, "/be", "tok", tx);
        assert_eq!(rx.try_recv().unwrap().path, "/be");
        t.write("/be/1/state", "2");
        assert_eq!(rx.try_recv().unwrap().path, "/be/1/state");
        t.write("/bee", "x");
        assert!(rx.try_recv().is_err());
        t.rm("/");
        assert_eq!(rx.try_recv().unwrap().path, "/");
        t.unwatch(0, "/be", "tok");
        t.write("/be/2", "1");
        assert!(rx.try_recv().is_err());
    }
}

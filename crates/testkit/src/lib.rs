//! The bad-input suites' checks (a dev-dependency of the binaries' crates).
//!
//! Each suite is a table of [`Case`]s: a command line that must be refused. [`Case::refused`]
//! runs it and asserts what a user must see: a non-zero exit of the binary's own error path (not
//! a panic, not a signal), no backtrace, and a message naming what is wrong (the file and the key,
//! line or tensor: the case's `needles`); and that every file under the watched directory is still
//! there, unchanged, with nothing new outside the paths the case may write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (tests run with the crate's directory as `CARGO_MANIFEST_DIR`).
pub fn repo() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("run under cargo")).join("../..")
}

/// Writes a case's config `dir/NAME.toml` and returns its path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// One bad input: the binary's arguments and what the error must say.
pub struct Case {
    pub name: String,
    pub args: Vec<String>,
    /// Each must appear in the standard error.
    pub needles: Vec<String>,
    /// Paths (under the watched directory) the refused command may create; none by default.
    pub may_create: Vec<PathBuf>,
    pub cwd: Option<PathBuf>,
}

impl Case {
    pub fn new(name: &str, args: &[&str], needles: &[&str]) -> Self {
        Self { name: name.into(), args: args.iter().map(|a| a.to_string()).collect(), needles: needles.iter().map(|n| n.to_string()).collect(), may_create: vec![], cwd: None }
    }

    pub fn may_create(mut self, path: impl Into<PathBuf>) -> Self {
        self.may_create.push(path.into());
        self
    }

    pub fn in_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Runs `binary` with the case's arguments and asserts that it is refused cleanly and that
    /// nothing under `watch` changed (see the crate doc). Returns the standard error.
    pub fn refused(&self, binary: &str, watch: &Path) -> String {
        let before = Tree::of(watch);
        let out = Command::new(binary).args(&self.args).current_dir(self.cwd.clone().unwrap_or_else(repo)).env_remove("RUST_BACKTRACE").output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        let what = format!("case `{}` ({} {})", self.name, binary.rsplit('/').next().unwrap_or(binary), self.args.join(" "));
        assert!(!out.status.success(), "{what}: should have been refused; stdout:\n{}", String::from_utf8_lossy(&out.stdout));
        // 1: the binary's `error: ...` path; 2: clap's usage errors. 101 is a panic; none, a signal.
        assert!(matches!(out.status.code(), Some(1 | 2)), "{what}: exit status {:?} (a panic or a crash), stderr:\n{err}", out.status);
        assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{what}: panicked:\n{err}");
        for needle in &self.needles {
            assert!(err.contains(needle.as_str()), "{what}: the message should name `{needle}`:\n{err}");
        }
        before.assert_kept(watch, &self.may_create, &what);
        err
    }
}

/// Runs every case ([`Case::refused`]) and fails once at the end, listing each case that was not
/// refused as it should be (so one run shows them all).
pub fn refuse_all(binary: &str, watch: &Path, cases: &[Case]) {
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case.refused(binary, watch))).err().map(|e| {
                e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| format!("case `{}` failed", case.name))
            })
        })
        .collect();
    assert!(failures.is_empty(), "{} of {} bad inputs were not refused as they should be:\n\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}

/// Every file and directory under a root, with file contents.
pub struct Tree(BTreeMap<PathBuf, Option<Vec<u8>>>);

impl Tree {
    pub fn of(root: &Path) -> Self {
        let mut entries = BTreeMap::new();
        fn walk(dir: &Path, entries: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
            let Ok(read) = std::fs::read_dir(dir) else { return };
            for entry in read.filter_map(|e| e.ok()) {
                let path = entry.path();
                let Ok(kind) = entry.file_type() else { continue };
                if kind.is_dir() {
                    entries.insert(path.clone(), None);
                    walk(&path, entries);
                } else if kind.is_file() {
                    entries.insert(path.clone(), std::fs::read(&path).ok());
                } else {
                    // FIFOs, sockets, symlinks: their presence is what counts.
                    entries.insert(path, Some(vec![]));
                }
            }
        }
        walk(root, &mut entries);
        Self(entries)
    }

    /// Asserts that every entry of `self` is still under `root` with the same contents, and that
    /// nothing new appeared outside `may_create`.
    pub fn assert_kept(&self, root: &Path, may_create: &[PathBuf], what: &str) {
        let now = Self::of(root);
        for (path, contents) in &self.0 {
            match now.0.get(path) {
                None => panic!("{what}: {} was removed", path.display()),
                Some(c) if c != contents => panic!("{what}: {} was changed", path.display()),
                _ => {}
            }
        }
        for path in now.0.keys().filter(|p| !self.0.contains_key(*p)) {
            assert!(may_create.iter().any(|allowed| path.starts_with(allowed)), "{what}: {} was created", path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Tree;

    fn fails(f: impl FnOnce()) -> String {
        let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).expect_err("should fail");
        e.downcast_ref::<String>().cloned().unwrap_or_default()
    }

    /// The tree check sees a removed, a changed and a created file, and allows what a case may
    /// create.
    #[test]
    fn the_tree_check_sees_every_change_outside_the_allowed_paths() {
        let dir = std::env::temp_dir().join(format!("llama-testkit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/a.txt"), "a").unwrap();
        std::fs::write(dir.join("b.txt"), "b").unwrap();
        let before = Tree::of(&dir);
        before.assert_kept(&dir, &[], "untouched");
        std::fs::write(dir.join("out.txt"), "new").unwrap();
        assert!(fails(|| before.assert_kept(&dir, &[], "created")).contains("out.txt was created"));
        before.assert_kept(&dir, &[dir.join("out.txt")], "allowed");
        std::fs::write(dir.join("b.txt"), "B").unwrap();
        assert!(fails(|| before.assert_kept(&dir, &[dir.join("out.txt")], "changed")).contains("b.txt was changed"));
        std::fs::write(dir.join("b.txt"), "b").unwrap();
        std::fs::remove_dir_all(dir.join("sub")).unwrap();
        assert!(fails(|| before.assert_kept(&dir, &[dir.join("out.txt")], "removed")).contains("was removed"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

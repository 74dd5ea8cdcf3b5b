//! The encoder cache shared by the encode and prefill/decode roles.
//!
//! Keys are hashes of decoded pixels. In one process (`--role both`) the
//! cache is a set in memory; across processes it is a directory with one
//! empty file per key, as vLLM's shared-storage encoder-cache connector keeps
//! one entry per image hash on a shared file system.

use crate::lock;
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Why the cache could not be used.
#[derive(Debug)]
pub struct CacheError {
    pub path: PathBuf,
    pub source: io::Error,
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "encoder cache {}: {}", self.path.display(), self.source)
    }
}

impl std::error::Error for CacheError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[derive(Debug)]
pub enum EcCache {
    Memory(Mutex<HashSet<u128>>),
    Dir(PathBuf),
}

/// File name of a key: 32 lower-case hex digits.
pub fn key_name(key: u128) -> String {
    format!("{key:032x}")
}

fn is_key_name(name: &str) -> bool {
    name.len() == 32
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl EcCache {
    pub fn memory() -> Self {
        Self::Memory(Mutex::new(HashSet::new()))
    }

    /// A directory cache, created if missing.
    pub fn dir(path: &Path) -> Result<Self, CacheError> {
        std::fs::create_dir_all(path).map_err(|source| CacheError {
            path: path.into(),
            source,
        })?;
        Ok(Self::Dir(path.into()))
    }

    pub fn contains(&self, key: u128) -> bool {
        match self {
            Self::Memory(set) => lock(set).contains(&key),
            Self::Dir(dir) => dir.join(key_name(key)).is_file(),
        }
    }

    pub fn insert(&self, key: u128) -> Result<(), CacheError> {
        match self {
            Self::Memory(set) => {
                lock(set).insert(key);
                Ok(())
            }
            Self::Dir(dir) => {
                let path = dir.join(key_name(key));
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map(drop)
                    .map_err(|source| CacheError { path, source })
            }
        }
    }

    /// Forgets every entry; returns how many were removed.
    pub fn clear(&self) -> Result<usize, CacheError> {
        match self {
            Self::Memory(set) => {
                let mut set = lock(set);
                let n = set.len();
                set.clear();
                Ok(n)
            }
            Self::Dir(dir) => {
                let err = |path: &Path| {
                    let path = path.to_path_buf();
                    move |source| CacheError { path, source }
                };
                let mut n = 0;
                for entry in std::fs::read_dir(dir).map_err(err(dir))? {
                    let entry = entry.map_err(err(dir))?;
                    let name = entry.file_name();
                    if name.to_str().is_some_and(is_key_name) {
                        let path = entry.path();
                        match std::fs::remove_file(&path) {
                            Ok(()) => n += 1,
                            // Removed by a peer process meanwhile.
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(err(&path)(e)),
                        }
                    }
                }
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_dir_behave_alike() {
        let dir = std::env::temp_dir().join(format!("vlm-emulator-cache-{}", std::process::id()));
        let caches = [EcCache::memory(), EcCache::dir(&dir).expect("dir")];
        for c in &caches {
            let k = 0x0123_4567_89ab_cdef_0011_2233_4455_6677u128;
            assert!(!c.contains(k));
            c.insert(k).expect("insert");
            c.insert(k).expect("insert twice");
            assert!(c.contains(k));
            assert!(!c.contains(k + 1));
            assert_eq!(c.clear().expect("clear"), 1);
            assert!(!c.contains(k));
        }
        assert!(dir.join("0000000000000000000000000000002a").to_str().is_some());
        assert_eq!(key_name(42), "0000000000000000000000000000002a");
        // A second handle on the same directory sees the first one's entries.
        let a = EcCache::dir(&dir).expect("a");
        let b = EcCache::dir(&dir).expect("b");
        a.insert(7).expect("insert");
        assert!(b.contains(7));
        std::fs::write(dir.join("unrelated.txt"), b"x").expect("write");
        assert_eq!(b.clear().expect("clear"), 1);
        assert!(dir.join("unrelated.txt").is_file());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

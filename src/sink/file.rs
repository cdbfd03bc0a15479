//! JSON lines appended to a file, rotated by size: `path` is renamed to
//! `path.1` (and `path.1` to `path.2`, ...) when the next line would make it
//! exceed `max_bytes`; `keep` rotated files are kept.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::stdout::LineSink;

/// A writer that rotates its file by size.
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: Option<File>,
    size: u64,
}

impl RotatingFile {
    /// Opens (appending to) `path`, creating its directory.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile { path: path.to_path_buf(), max_bytes: max_bytes.max(1), keep, file: Some(file), size })
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(f) = self.file.as_mut() {
            f.flush()?;
        }
        if self.keep == 0 {
            std::fs::remove_file(&self.path).ok();
        } else {
            std::fs::remove_file(self.rotated(self.keep)).ok();
            for n in (1..self.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        // Until this succeeds the old handle (now the rotated file) keeps taking lines.
        self.file = Some(OpenOptions::new().create(true).append(true).open(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let file = self.file.as_mut().ok_or_else(|| std::io::Error::other("file closed"))?;
        file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().map(|f| f.flush()).unwrap_or(Ok(()))
    }
}

/// A sink appending JSON lines to a rotating file.
pub fn file_sink(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<(LineSink, std::thread::JoinHandle<()>)> {
    let file = RotatingFile::open(path, max_bytes, keep)?;
    LineSink::spawn("out-file", move || Box::new(file) as Box<dyn Write + Send>)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/results.jsonl");
        let mut f = RotatingFile::open(&p, 25, 2).unwrap();
        for i in 0..5 {
            f.write_all(format!("line {i} xxxxxxxx\n").as_bytes()).unwrap();
        }
        f.flush().unwrap();
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(p.clone()), "line 4 xxxxxxxx\n");
        assert_eq!(read(dir.path().join("sub/results.jsonl.1")), "line 3 xxxxxxxx\n");
        assert_eq!(read(dir.path().join("sub/results.jsonl.2")), "line 2 xxxxxxxx\n");
        assert!(!dir.path().join("sub/results.jsonl.3").exists());
    }
}

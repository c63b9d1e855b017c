//! Small file helpers shared by every reader and writer: decoding with precise errors and
//! atomic writes (temp file in the same folder, fsync, rename), so that a failed or interrupted
//! write never leaves a half-written file where a good one was.

use crate::error::{DataError, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Read a whole file as bytes.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}

/// Read a UTF-8 text file; invalid UTF-8 is reported with the line where it occurs.
pub fn read_utf8(path: &Path) -> Result<String> {
    let bytes = read_bytes(path)?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => {
            let upto = e.utf8_error().valid_up_to();
            let bytes = e.as_bytes();
            let line = bytes[..upto].iter().filter(|&&b| b == b'\n').count() + 1;
            Err(DataError::parse(
                path,
                line,
                format!(
                    "invalid UTF-8 (byte 0x{:02x} at offset {upto}); this format must be UTF-8",
                    bytes[upto]
                ),
            ))
        }
    }
}

/// Decode ISO-8859-1 (Latin-1): every byte is one code point. MovieLens raw files use it.
pub fn decode_latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// Lines of a text with their 1-based numbers; a trailing `\r` is removed (CRLF files).
pub fn numbered_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().map(|(i, l)| (i + 1, l))
}

/// A writer that becomes `path` only when `commit` is called.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<std::io::BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(dest: impl AsRef<Path>) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        if let Some(parent) = dest.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{name}.{}.partial", std::process::id()));
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        Ok(AtomicFile {
            tmp,
            dest,
            file: Some(std::io::BufWriter::new(file)),
        })
    }

    pub fn commit(mut self) -> Result<()> {
        let w = self.file.take().expect("file present until commit");
        let f = w
            .into_inner()
            .map_err(|e| DataError::io(&self.tmp, e.into_error()))?;
        f.sync_all().map_err(|e| DataError::io(&self.tmp, e))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| DataError::io(&self.dest, e))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("open").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("open").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Write a file atomically from a closure that fills it.
pub fn write_atomic(
    dest: &Path,
    fill: impl FnOnce(&mut AtomicFile) -> std::io::Result<()>,
) -> Result<()> {
    let mut f = AtomicFile::create(dest)?;
    fill(&mut f).map_err(|e| DataError::io(dest, e))?;
    f.commit()
}

/// Write bytes atomically.
pub fn write_bytes_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(dest, |f| f.write_all(bytes))
}

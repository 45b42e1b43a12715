//! A writer for the "newc" cpio format (magic "070701"), the one the kernel unpacks as an
//! initramfs. Entries are written straight from memory, so no staging directory is walked and
//! no path ever goes through a shell.
use std::{collections::BTreeSet, io::Write};

use anyhow::{Context as _, bail};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;

pub struct Writer<W: Write> {
    out: W,
    /// Every entry gets its own inode number: the kernel treats regular files that share
    /// (ino, nlink > 1) as hard links.
    next_ino: u32,
    /// Names written so far: parents are written once, and a file twice is a bug.
    names: BTreeSet<String>,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            names: BTreeSet::new(),
        }
    }

    /// A directory (mode 0755), and its parents first.
    pub fn dir(&mut self, path: &str) -> anyhow::Result<()> {
        let path = relative(path)?;
        let mut sofar = String::new();
        for part in path.split('/') {
            if !sofar.is_empty() {
                sofar.push('/');
            }
            sofar.push_str(part);
            if self.names.insert(sofar.clone()) {
                self.entry(&sofar, S_IFDIR | 0o755, 2, &[])?;
            }
        }
        Ok(())
    }

    /// A regular file with permission bits `perm` (e.g. 0o755); missing parent directories
    /// are written first, since the kernel does not create them while unpacking.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> anyhow::Result<()> {
        let path = relative(path)?;
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        if !self.names.insert(path.to_string()) {
            bail!("{path} written twice into the cpio archive");
        }
        self.entry(path, S_IFREG | (perm & 0o7777), 1, data)
    }

    /// Whether an entry of this name was written.
    pub fn has(&self, path: &str) -> bool {
        relative(path).is_ok_and(|p| self.names.contains(p))
    }

    /// Writes the TRAILER!!! entry that ends the archive and returns the output.
    pub fn finish(mut self) -> anyhow::Result<W> {
        self.entry(TRAILER, 0, 1, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> anyhow::Result<()> {
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let size = u32::try_from(data.len()).with_context(|| format!("{name}: over 4 GiB"))?;
        let namesize = name.len() as u32 + 1; // with its NUL
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize
        // check; mtime 0 keeps the archive reproducible.
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0];
        let mut header = String::from(MAGIC);
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        let w = &mut self.out;
        w.write_all(header.as_bytes())?;
        w.write_all(name.as_bytes())?;
        w.write_all(&[0])?;
        // Header (110 bytes) plus name, then the data, are each padded to 4 bytes.
        w.write_all(&[0; 3][..pad4(header.len() + namesize as usize)])?;
        w.write_all(data)?;
        w.write_all(&[0; 3][..pad4(data.len())])
            .with_context(|| format!("writing {name} into the cpio archive"))
    }
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Archive names are relative ("bin/immp"), as `find . | cpio` would give minus the "./".
fn relative(path: &str) -> anyhow::Result<&str> {
    let p = path.trim_start_matches('/').trim_end_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        bail!("bad path for the initramfs: {path:?}");
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Entry {
        offset: usize,
        name: String,
        fields: Vec<u32>,
        data: Vec<u8>,
    }

    /// An independent reader of newc archives, to check what the writer wrote.
    fn parse(buf: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            assert_eq!(at % 4, 0, "entry at {at} not 4-byte aligned");
            assert_eq!(&buf[at..at + 6], b"070701");
            let hex = std::str::from_utf8(&buf[at + 6..at + 110]).unwrap();
            let fields: Vec<u32> = (0..13)
                .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).unwrap())
                .collect();
            let namesize = fields[11] as usize;
            let name_end = at + 110 + namesize;
            assert_eq!(buf[name_end - 1], 0, "name not NUL-terminated");
            let name = String::from_utf8(buf[at + 110..name_end - 1].to_vec()).unwrap();
            let data_at = name_end + pad4(110 + namesize);
            let data = buf[data_at..data_at + fields[6] as usize].to_vec();
            let next = data_at + data.len() + pad4(data.len());
            let done = name == TRAILER;
            out.push(Entry {
                offset: at,
                name,
                fields,
                data,
            });
            if done {
                assert_eq!(next, buf.len(), "bytes after the trailer");
                return out;
            }
            at = next;
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new());
        w.dir("proc").unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("lib/x86_64-linux-gnu/libc.so.6", 0o644, b"12345")
            .unwrap();
        w.file("lib/x86_64-linux-gnu/empty", 0o600, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn header_fields() {
        let buf = sample();
        let e = parse(&buf);
        let init = e.iter().find(|e| e.name == "init").unwrap();
        // [ino, mode, uid, gid, nlink, mtime, filesize, .., namesize, check]
        assert_eq!(init.fields[1], 0o100755);
        assert_eq!(init.fields[4], 1);
        assert_eq!(init.fields[6], 18);
        assert_eq!(init.fields[11], 5);
        assert_eq!(init.data, b"#!/bin/sh\necho hi\n");
        let proc = e.iter().find(|e| e.name == "proc").unwrap();
        assert_eq!(proc.fields[1], 0o040755);
        let inos: BTreeSet<u32> = e[..e.len() - 1].iter().map(|e| e.fields[0]).collect();
        assert_eq!(inos.len(), e.len() - 1, "inode numbers repeat");
    }

    #[test]
    fn parents_first_and_once() {
        let names: Vec<String> = parse(&sample()).into_iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                "proc",
                "init",
                "lib",
                "lib/x86_64-linux-gnu",
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib/x86_64-linux-gnu/empty",
                TRAILER
            ]
        );
    }

    #[test]
    fn padding_and_trailer() {
        let buf = sample();
        assert_eq!(buf.len() % 4, 0);
        let e = parse(&buf);
        let libc = e.iter().find(|e| e.name.ends_with("libc.so.6")).unwrap();
        // 110 + 31 = 141 -> 3 bytes of padding; 5 data bytes -> 3 more.
        let data_at = libc.offset + 110 + 31 + 3;
        assert_eq!(&buf[data_at..data_at + 5], b"12345");
        assert_eq!(&buf[data_at + 5..data_at + 8], &[0, 0, 0]);
        let last = e.last().unwrap();
        assert_eq!(last.name, TRAILER);
        assert_eq!((last.fields[6], last.fields[11]), (0, 11));
    }

    #[test]
    fn twice_refused() {
        let mut w = Writer::new(Vec::new());
        w.file("bin/a", 0o755, b"x").unwrap();
        assert!(w.has("/bin/a") && w.has("bin"));
        assert!(w.file("/bin/a", 0o755, b"y").is_err());
    }

    #[test]
    fn bad_paths_refused() {
        let mut w = Writer::new(Vec::new());
        for p in ["", "/", "a/../b", "a//b", "./a"] {
            assert!(w.file(p, 0o644, b"").is_err(), "{p:?} accepted");
        }
    }

    /// GNU cpio, when installed, must list and extract the same files with the same modes.
    #[test]
    fn system_cpio_reads_it() {
        use std::os::unix::fs::PermissionsExt as _;
        use std::process::{Command, Stdio};
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("cpio not installed: round trip skipped (the parser tests still ran)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("xtask-cpio-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new("cpio")
            .args(["-i", "-d", "--quiet"])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&sample()).unwrap();
        assert!(child.wait().unwrap().success());
        let init = dir.join("init");
        assert_eq!(std::fs::read(&init).unwrap(), b"#!/bin/sh\necho hi\n");
        let mode = std::fs::metadata(&init).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        let libc = dir.join("lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(std::fs::read(libc).unwrap(), b"12345");
        assert!(dir.join("proc").is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

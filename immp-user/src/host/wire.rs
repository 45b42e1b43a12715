//! One JSON message per line over a unix socket, with deadlines: what QMP and the guest agent
//! both speak. A read that times out keeps the part of a line it got, so a slow peer never
//! loses a message.
use std::{
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;

pub struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
    /// Bytes of a line not complete yet.
    pending: Vec<u8>,
    pub path: PathBuf,
}

/// What went wrong, so that callers can say which exit code it deserves.
#[derive(Debug)]
pub enum WireError {
    /// No socket there, not a socket, nobody listening: the path given is wrong.
    Connect(std::io::Error),
    /// The peer closed the connection.
    Closed,
    Io(std::io::Error),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Connect(e) => write!(f, "cannot connect: {e}"),
            WireError::Closed => f.write_str("the other side closed the connection"),
            WireError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for WireError {}

impl Conn {
    pub fn connect(path: &Path) -> Result<Self, WireError> {
        let s = UnixStream::connect(path).map_err(WireError::Connect)?;
        let r = s.try_clone().map_err(WireError::Io)?;
        // Writes are small; a peer that stops reading altogether must not hang us forever.
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(WireError::Io)?;
        Ok(Self {
            w: s,
            r: BufReader::new(r),
            pending: Vec::new(),
            path: path.to_path_buf(),
        })
    }

    /// Sends one message as a JSON line.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), WireError> {
        let mut line = serde_json::to_vec(msg).map_err(|e| WireError::Io(e.into()))?;
        line.push(b'\n');
        self.send_raw(&line)
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.w.write_all(bytes).map_err(|e| match e.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => WireError::Closed,
            _ => WireError::Io(e),
        })
    }

    /// The next line (without its newline), or `None` once `deadline` passes.
    pub fn read_line(&mut self, deadline: Instant) -> Result<Option<Vec<u8>>, WireError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // A zero timeout means "block forever" to the socket: never pass one.
            let wait = left.max(Duration::from_millis(1));
            self.r
                .get_ref()
                .set_read_timeout(Some(wait))
                .map_err(WireError::Io)?;
            match self.r.read_until(b'\n', &mut self.pending) {
                Ok(0) => return Err(WireError::Closed),
                Ok(_) if self.pending.ends_with(b"\n") => {
                    let mut line = std::mem::take(&mut self.pending);
                    line.pop();
                    return Ok(Some(line));
                }
                Ok(_) => return Err(WireError::Closed), // EOF in the middle of a line
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return Err(WireError::Closed);
                }
                Err(e) => return Err(WireError::Io(e)),
            }
        }
    }
}

/// A line shown in an error message: short, printable.
pub fn show(line: &[u8]) -> String {
    let s = String::from_utf8_lossy(line);
    let s: String = s.chars().filter(|c| !c.is_control()).take(60).collect();
    if s.is_empty() {
        "an empty line".into()
    } else {
        format!("`{s}`")
    }
}

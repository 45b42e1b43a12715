//! Text that reaches a terminal. Process names and command lines are chosen by whoever runs
//! the process (any user can call itself `\x1b[31mRED`): every one is cleaned before a table,
//! a log line or the TUI shows it, so that no escape sequence reaches root's terminal. JSON and
//! CSV quote by themselves.
use std::borrow::Cow;

/// Bidirectional-text controls: not control characters to Rust, but they reorder what a
/// terminal shows (a name could display as something else).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character (C0, DEL, C1) and bidi control written as a visible
/// escape (`\x1b`, `\u{202e}`); unchanged (borrowed) when there is none.
pub fn clean(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            c if (c as u32) < 0x100 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() || is_bidi_control(c) => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A cleaned name cut to `width` characters (a `~` marks the cut), for fixed-width columns.
pub fn column(s: &str, width: usize) -> String {
    let c = clean(s);
    if c.chars().count() <= width {
        return c.into_owned();
    }
    let mut out: String = c.chars().take(width.saturating_sub(1)).collect();
    out.push('~');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_control_character() {
        assert_eq!(clean("\x1b[31mRED"), "\\x1b[31mRED");
        assert_eq!(clean("a\nb\tc\x7f\u{9b}"), "a\\x0ab\\x09c\\x7f\\x9b");
        assert_eq!(clean("evil\u{202e}gpj.exe"), "evil\\u{202e}gpj.exe");
        assert!(matches!(clean("bash"), Cow::Borrowed("bash")));
        assert_eq!(clean("ünïcödé"), "ünïcödé");
    }

    #[test]
    fn columns_are_cut_and_clean() {
        assert_eq!(column("short", 16), "short");
        assert_eq!(column("a-very-long-process-name", 8), "a-very-~");
        assert_eq!(column("\x1b", 16), "\\x1b");
        for s in ["\x1b[2J\x1b[H", "x\u{7}y", "\u{9b}31m"] {
            assert!(!column(s, 16).chars().any(char::is_control), "{s:?}");
        }
    }
}

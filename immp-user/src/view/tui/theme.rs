//! Styles. Colour only ever repeats what a word or a symbol already says (the verdict is a
//! word, a capped slot a digit, an exited row says `gone`); without colour (`NO_COLOR`,
//! `--monochrome`) only bold, dim, underline and reverse video remain.
use immp_model::rank::Verdict;
use ratatui::style::{Color, Modifier, Style};

use super::state::LogKind;

#[derive(Debug, Clone, Copy)]
pub struct Theme {
    pub color: bool,
}

impl Theme {
    fn fg(&self, c: Color) -> Style {
        if self.color {
            Style::new().fg(c)
        } else {
            Style::new()
        }
    }

    pub fn plain(&self) -> Style {
        Style::new()
    }

    pub fn title(&self) -> Style {
        self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    }

    pub fn label(&self) -> Style {
        self.fg(Color::Gray).add_modifier(Modifier::BOLD)
    }

    pub fn bad(&self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }

    pub fn good(&self) -> Style {
        self.fg(Color::Green)
    }

    pub fn warn(&self) -> Style {
        self.fg(Color::Yellow).add_modifier(Modifier::BOLD)
    }

    pub fn dim(&self) -> Style {
        self.fg(Color::DarkGray).add_modifier(Modifier::DIM)
    }

    pub fn cap(&self) -> Style {
        self.fg(Color::Magenta).add_modifier(Modifier::BOLD)
    }

    pub fn selected(&self) -> Style {
        Style::new().add_modifier(Modifier::REVERSED)
    }

    /// The sorted column's header: underlined and bold as well as coloured.
    pub fn sorted(&self) -> Style {
        self.title().add_modifier(Modifier::UNDERLINED)
    }

    pub fn verdict(&self, v: Option<Verdict>) -> Style {
        match v {
            Some(Verdict::Immp) => self.bad(),
            Some(Verdict::Writer) => self.warn().remove_modifier(Modifier::BOLD),
            _ => self.plain(),
        }
    }

    pub fn log(&self, k: LogKind) -> Style {
        match k {
            LogKind::Info => self.plain(),
            LogKind::Cap => self.cap(),
            LogKind::Lift => self.good(),
            LogKind::Gone => self.dim(),
            LogKind::Warn => self.warn(),
        }
    }

    /// A history slot under a cap: underlined (and coloured).
    pub fn capped_slot(&self) -> Style {
        self.fg(Color::Magenta).add_modifier(Modifier::UNDERLINED)
    }

    pub fn gauge(&self, over: bool) -> Style {
        if over { self.bad() } else { self.good() }
    }
}

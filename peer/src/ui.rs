//! How lines are typed and shown: a line editor on a terminal, plain lines on pipes.
//!
//! - Terminal: rustyline runs in its own thread (its `readline` blocks); incoming
//!   lines go through rustyline's external printer, which redraws the line being
//!   typed below them instead of garbling it. `/help` and `/quit` are handled here.
//! - Pipes: every input line is one message, sent verbatim; every received message
//!   is one `NAME: TEXT` line on stdout; status goes to stderr.
//!
//! Text from the other side is sanitised before it reaches a terminal or stdout.

use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use punchline_proto::sanitize_for_terminal;
use rustyline::error::ReadlineError;
use rustyline::{DefaultEditor, ExternalPrinter};
use tokio::sync::mpsc;

use crate::chat::{Input, Output};

/// Capacity of the channel from the input thread to the chat. Small: typing and
/// pipes are slow next to the link, and a full channel makes the reader wait
/// instead of buffering without bound.
pub const INPUT_CHANNEL: usize = 64;

/// The terminal commands, as `/help` shows them.
pub const HELP: &str = "\
commands:
  /help        show this help
  /info        the link: direct or relayed, addresses, round-trip time, NAT
               findings, encryption, lines and bytes each way
  /verify      show the words to compare with the other side: if they differ,
               someone is intercepting the chat
  /nick NAME   go by another name (the other side is told)
  /quit        say goodbye and leave (also Ctrl-D or Ctrl-C)
  //text       send a line that starts with '/'
anything else is sent to the other side as one line; up and down recall
earlier lines";

/// What a typed terminal line means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Typed {
    /// Send this text.
    Send(String),
    /// Leave.
    Quit,
    /// Show the help.
    Help,
    /// Show the verification words.
    Verify,
    /// Show the link's details.
    Info,
    /// Change our name.
    Nick(String),
    /// A known command used wrongly: how to use it.
    Usage(&'static str),
    /// An unknown `/command`.
    Unknown(String),
    /// Nothing to send.
    Empty,
}

/// Interprets one line typed on the terminal.
pub fn parse_typed(line: &str) -> Typed {
    if line.trim().is_empty() {
        return Typed::Empty;
    }
    if let Some(rest) = line.strip_prefix("//") {
        return Typed::Send(format!("/{rest}"));
    }
    if !line.starts_with('/') {
        return Typed::Send(line.to_owned());
    }
    let trimmed = line.trim();
    let (cmd, rest) = trimmed
        .split_once(char::is_whitespace)
        .unwrap_or((trimmed, ""));
    let rest = rest.trim();
    match (cmd, rest.is_empty()) {
        ("/quit" | "/exit", true) => Typed::Quit,
        ("/help" | "/?", true) => Typed::Help,
        ("/verify", true) => Typed::Verify,
        ("/info", true) => Typed::Info,
        ("/nick", false) => Typed::Nick(rest.to_owned()),
        ("/nick", true) => Typed::Usage("/nick NAME: go by NAME from now on"),
        ("/quit" | "/exit" | "/help" | "/?" | "/verify" | "/info", false) => {
            Typed::Usage("that command takes no argument; /help lists the commands")
        }
        _ => Typed::Unknown(cmd.to_owned()),
    }
}

/// Reads stdin line by line in a thread of its own: each line (without its line
/// terminator; invalid UTF-8 replaced) becomes [`Input::Line`], end of input
/// becomes [`Input::Quit`]. A plain thread, not a runtime task, so a read blocked at
/// exit never holds the process.
pub fn spawn_stdin_lines(tx: mpsc::Sender<Input>) {
    thread::spawn(move || {
        let stdin = io::stdin();
        let mut stdin = stdin.lock();
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match stdin.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if buf.last() == Some(&b'\n') {
                        buf.pop();
                        if buf.last() == Some(&b'\r') {
                            buf.pop();
                        }
                    }
                    let line = String::from_utf8_lossy(&buf).into_owned();
                    if tx.blocking_send(Input::Line(line)).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.blocking_send(Input::Quit);
    });
}

/// How shown lines are dressed: the other's name in colour, optional timestamps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    /// Colour names and dim status lines (ANSI escapes).
    pub colour: bool,
    /// Prefix lines with the local time.
    pub timestamps: bool,
}

const NAME_COLOUR: &str = "\x1b[1;36m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl Style {
    /// Colour where it belongs: stdout is a terminal and `NO_COLOR` is not set
    /// (to anything but the empty string, per no-color.org).
    pub fn for_stdout(timestamps: bool) -> Style {
        use std::io::IsTerminal;
        Style {
            colour: colour_wanted(std::env::var_os("NO_COLOR"), io::stdout().is_terminal()),
            timestamps,
        }
    }

    /// A received line: `NAME: TEXT`, both sanitised.
    pub fn incoming(&self, name: &str, text: &str) -> String {
        let (name, text) = (sanitize_for_terminal(name), sanitize_for_terminal(text));
        if self.colour {
            format!("{}{NAME_COLOUR}{name}{RESET}: {text}", self.stamp())
        } else {
            format!("{}{name}: {text}", self.stamp())
        }
    }

    /// A status line, prefixed with `prefix`.
    pub fn status(&self, prefix: &str, message: &str) -> String {
        if self.colour {
            format!("{DIM}{}{prefix}{message}{RESET}", self.stamp())
        } else {
            format!("{}{prefix}{message}", self.stamp())
        }
    }

    fn stamp(&self) -> String {
        if self.timestamps {
            format!("[{}] ", local_time())
        } else {
            String::new()
        }
    }
}

/// Colour only on a terminal, and not when `NO_COLOR` holds anything.
fn colour_wanted(no_colour: Option<std::ffi::OsString>, terminal: bool) -> bool {
    terminal && no_colour.is_none_or(|v| v.is_empty())
}

/// The local wall-clock time as HH:MM:SS.
fn local_time() -> String {
    // SAFETY: time() with a null pointer only returns the time; localtime_r fills
    // the zeroed tm it is given (plain data) and returns null on failure.
    unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return "--:--:--".to_owned();
        }
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    }
}

/// Output for pipes: `NAME: TEXT` lines on stdout, status on stderr.
#[derive(Default)]
pub struct LinesOutput {
    /// How lines are dressed.
    pub style: Style,
}

impl Output for LinesOutput {
    fn incoming(&mut self, name: &str, text: &str) {
        let mut out = io::stdout().lock();
        // A closed stdout (the reader went away) is not a reason to stop the chat.
        let _ = writeln!(out, "{}", self.style.incoming(name, text));
        let _ = out.flush();
    }

    fn status(&mut self, message: &str) {
        eprintln!("{message}");
    }
}

/// Status messages on stderr (before the chat starts, in both modes).
pub struct StderrStatus;

impl Output for StderrStatus {
    fn incoming(&mut self, name: &str, text: &str) {
        LinesOutput::default().incoming(name, text);
    }

    fn status(&mut self, message: &str) {
        eprintln!("{message}");
    }
}

/// Where typed lines are remembered between chats: `$XDG_DATA_HOME/punchline/history`,
/// else `~/.local/share/punchline/history`. `None` without a home.
pub fn default_history_path() -> Option<PathBuf> {
    let nonempty = |v: std::ffi::OsString| (!v.is_empty()).then_some(v);
    let base = std::env::var_os("XDG_DATA_HOME")
        .and_then(nonempty)
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(nonempty)
                .map(|h| PathBuf::from(h).join(".local/share"))
        })?;
    Some(base.join("punchline").join("history"))
}

/// Creates the history file (and its folder) readable by the user only: it holds
/// what was typed in chats.
fn prepare_history(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

/// Lines of history kept.
pub const HISTORY_SIZE: usize = 1000;

/// The interactive terminal: a line editor thread and its external printer.
pub struct Terminal {
    printer: Box<dyn ExternalPrinter + Send>,
    saved: Option<libc::termios>,
    style: Style,
}

impl Terminal {
    /// Starts the line editor; typed lines go to `tx`; `/verify` shows
    /// `verification`; lines typed are kept in `history` if given.
    pub fn start(
        tx: mpsc::Sender<Input>,
        verification: String,
        style: Style,
        history: Option<PathBuf>,
    ) -> io::Result<Terminal> {
        let saved = save_termios();
        let config = rustyline::Config::builder()
            .max_history_size(HISTORY_SIZE)
            .map_err(io::Error::other)?
            .auto_add_history(false)
            .build();
        let mut editor = DefaultEditor::with_config(config).map_err(io::Error::other)?;
        let history = history.filter(|path| match prepare_history(path) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("-- history off: cannot use {}: {e}", path.display());
                false
            }
        });
        if let Some(path) = &history {
            let _ = editor.load_history(path);
        }
        let printer = editor.create_external_printer().map_err(io::Error::other)?;
        thread::spawn(move || edit_loop(editor, tx, &verification, history));
        Ok(Terminal {
            printer: Box::new(printer),
            saved,
            style,
        })
    }

    /// Puts the terminal back as it was before the editor started, so the process
    /// can exit while the editor thread still waits for a key.
    pub fn restore(&mut self) {
        // The editor thread draws what the printer queued; give it a moment so the
        // last received lines are on screen before the terminal changes mode.
        thread::sleep(Duration::from_millis(100));
        if let Some(saved) = &self.saved {
            // SAFETY: `saved` came from tcgetattr on the same descriptor.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved);
            }
        }
        eprintln!();
    }
}

impl Output for Terminal {
    fn incoming(&mut self, name: &str, text: &str) {
        let line = self.style.incoming(name, text);
        if self.printer.print(line.clone()).is_err() {
            println!("{line}");
        }
    }

    fn status(&mut self, message: &str) {
        let line = self.style.status("-- ", message);
        if self.printer.print(line.clone()).is_err() {
            eprintln!("{line}");
        }
    }
}

fn save_termios() -> Option<libc::termios> {
    // SAFETY: termios is plain old data; tcgetattr fills it or fails.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a termios for the duration of the call.
    let rc = unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) };
    (rc == 0).then_some(t)
}

fn edit_loop(
    mut editor: DefaultEditor,
    tx: mpsc::Sender<Input>,
    verification: &str,
    history: Option<PathBuf>,
) {
    println!("type a line and press Enter to send it; /help for commands");
    loop {
        let input = match editor.readline("> ") {
            Ok(line) => {
                let typed = parse_typed(&line);
                if matches!(typed, Typed::Send(_) | Typed::Nick(_)) {
                    let _ = editor.add_history_entry(line.as_str());
                    if let Some(path) = &history {
                        let _ = editor.append_history(path);
                    }
                }
                match typed {
                    Typed::Empty => {
                        println!("empty line: nothing sent");
                        continue;
                    }
                    Typed::Help => {
                        println!("{HELP}");
                        continue;
                    }
                    Typed::Verify => {
                        println!("verification: {verification}  (the other side must see the same words)");
                        continue;
                    }
                    Typed::Usage(usage) => {
                        println!("usage: {usage}");
                        continue;
                    }
                    Typed::Unknown(cmd) => {
                        println!("unknown command {cmd}: /help lists the commands (start with // to send a line beginning with /)");
                        continue;
                    }
                    Typed::Quit => Input::Quit,
                    Typed::Info => Input::Info,
                    Typed::Nick(name) => Input::Nick(name),
                    Typed::Send(text) => Input::Line(text),
                }
            }
            Err(ReadlineError::Interrupted) => Input::Interrupted,
            Err(_) => Input::Quit,
        };
        let last = matches!(input, Input::Quit | Input::Interrupted);
        if tx.blocking_send(input).is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(None, true));
        assert!(colour_wanted(Some("".into()), true));
        assert!(!colour_wanted(Some("1".into()), true));
        assert!(!colour_wanted(None, false));
    }

    #[test]
    fn styles() {
        let plain = Style::default();
        assert_eq!(plain.incoming("bob", "hi\x1b[2J"), "bob: hi\u{FFFD}[2J");
        assert_eq!(plain.status("-- ", "left"), "-- left");
        let coloured = Style {
            colour: true,
            timestamps: false,
        };
        assert_eq!(coloured.incoming("bob", "hi"), "\x1b[1;36mbob\x1b[0m: hi");
        let stamped = Style {
            colour: false,
            timestamps: true,
        }
        .incoming("bob", "hi");
        // [HH:MM:SS] bob: hi
        let (stamp, rest) = stamped.split_at(11);
        assert_eq!(rest, "bob: hi");
        assert!(stamp.starts_with('[') && stamp.ends_with("] "), "{stamped}");
        assert!(
            stamp[1..9].chars().all(|c| c.is_ascii_digit() || c == ':'),
            "{stamped}"
        );
    }

    #[test]
    fn typed_lines() {
        assert_eq!(parse_typed("hello"), Typed::Send("hello".into()));
        assert_eq!(parse_typed("  "), Typed::Empty);
        assert_eq!(parse_typed("/quit"), Typed::Quit);
        assert_eq!(parse_typed("/help"), Typed::Help);
        assert_eq!(parse_typed("/verify"), Typed::Verify);
        assert_eq!(parse_typed("/frob x"), Typed::Unknown("/frob".into()));
        assert_eq!(parse_typed("/info"), Typed::Info);
        assert_eq!(parse_typed("/nick  Ada L "), Typed::Nick("Ada L".into()));
        assert!(matches!(parse_typed("/nick"), Typed::Usage(_)));
        assert!(matches!(parse_typed("/quit now"), Typed::Usage(_)));
        assert_eq!(parse_typed("//etc/hosts"), Typed::Send("/etc/hosts".into()));
        assert_eq!(
            parse_typed(" leading space"),
            Typed::Send(" leading space".into())
        );
    }
}

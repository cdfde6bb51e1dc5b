//! How lines are typed and shown: a line editor on a terminal, plain lines on pipes.
//!
//! - Terminal: rustyline runs in its own thread (its `readline` blocks); incoming
//!   lines go through rustyline's external printer, which redraws the line being
//!   typed below them instead of garbling it. `/help` and `/quit` are handled here.
//!   The printer can block (it hands one line at a time to the editor thread, and
//!   writes to the terminal), so a thread of its own feeds it from a queue: a
//!   stalled terminal never holds up a runtime worker, and so never the chat.
//! - Pipes: every input line is one message, sent verbatim; every received message
//!   is one `NAME: TEXT` line on stdout; status goes to stderr.
//!
//! Text from elsewhere is sanitised before it reaches a terminal or stdout: the
//! other side's names and lines, and every status message (which may quote a
//! server or an error), line by line ([`sanitize_lines`]).

use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
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

/// Lines queued for the terminal, at most. A terminal keeps up with any chat; this
/// is room for a burst while it is briefly stalled (a slow remote session, a
/// paused pane), in memory bounded by this many lines of at most
/// [`punchline_proto::MAX_LINE_BYTES`] each (8 MiB). Lines beyond it are not
/// shown, and the user is told how many ([`missed_notice`]).
pub const PRINT_QUEUE: usize = 1024;

/// How long leaving waits for the queued lines to reach the terminal.
const PRINT_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The terminal commands, as `/help` shows them.
pub const HELP: &str = "\
commands:
  /help        show this help
  /info        the link: direct or relayed, addresses, round-trip time, NAT
               findings, encryption, lines and bytes each way
  /verify      show the words to compare with the other side: if they differ,
               someone is intercepting the chat
  /nick NAME   go by another name (the other side is told)
  /save NAME   keep the other side as a contact: later, `peer @NAME` meets
               them with no code (once they have saved you too)
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
    /// Keep the other side as a contact.
    Save(String),
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
        ("/save", false) => Typed::Save(rest.to_owned()),
        ("/save", true) => Typed::Usage(
            "/save NAME: keep the other side as a contact, met later with `peer @NAME`",
        ),
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

    /// A status line, prefixed with `prefix`; the message is sanitised line by
    /// line ([`sanitize_lines`]).
    pub fn status(&self, prefix: &str, message: &str) -> String {
        let message = sanitize_lines(message);
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

/// Text from anywhere made safe for a terminal line by line: each line is
/// sanitised ([`sanitize_for_terminal`]: no control, bidi or other format
/// character survives), and the line breaks between them are kept, so that a
/// diagnosis of several lines still reads as several lines.
pub fn sanitize_lines(text: &str) -> String {
    text.split('\n')
        .map(|line| sanitize_for_terminal(line.strip_suffix('\r').unwrap_or(line)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The notice for lines the terminal did not keep up with.
pub fn missed_notice(missed: u64) -> String {
    format!(
        "{missed} line{} not shown: the terminal did not keep up",
        if missed == 1 { "" } else { "s" }
    )
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
        eprintln!("{}", sanitize_lines(message));
    }
}

/// Status messages on stderr (before the chat starts, in both modes).
pub struct StderrStatus;

impl Output for StderrStatus {
    fn incoming(&mut self, name: &str, text: &str) {
        LinesOutput::default().incoming(name, text);
    }

    fn status(&mut self, message: &str) {
        eprintln!("{}", sanitize_lines(message));
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

/// A line for the terminal, and where it goes should the line editor's printer
/// fail.
enum Shown {
    /// A received line (stdout).
    Incoming(String),
    /// A status line (stderr).
    Status(String),
}

impl Shown {
    /// Writes the line straight to its stream (blocking).
    fn write_direct(self) {
        match self {
            Shown::Incoming(line) => println!("{line}"),
            Shown::Status(line) => eprintln!("{line}"),
        }
    }
}

/// Hands queued lines to the line editor's printer until the queue closes, then
/// says so on `done`.
fn print_loop(
    mut printer: Box<dyn ExternalPrinter + Send>,
    queue: std_mpsc::Receiver<Shown>,
    done: std_mpsc::SyncSender<()>,
) {
    for shown in queue {
        // With its newline: between two `readline` calls (just after Enter,
        // say) the editor is out of raw mode and the printer writes the text
        // as it is, where the next prompt would otherwise be drawn over a line
        // left open (or the next message run on into it). In raw mode the
        // editor adds the newline only when it is missing.
        let line = match &shown {
            Shown::Incoming(line) | Shown::Status(line) => format!("{line}\n"),
        };
        if printer.print(line).is_err() {
            shown.write_direct();
        }
    }
    let _ = done.try_send(());
}

/// The interactive terminal: a line editor thread, and a printer thread that
/// feeds its external printer from a bounded queue.
pub struct Terminal {
    /// The printer thread's queue; `None` once closed.
    queue: Option<std_mpsc::SyncSender<Shown>>,
    /// Signalled by the printer thread once the queue is drained and closed.
    printed: std_mpsc::Receiver<()>,
    /// Lines not shown since the queue was last full.
    missed: u64,
    saved: Option<libc::termios>,
    style: Style,
}

impl Terminal {
    /// Starts the line editor; typed lines (and commands for the chat, such as
    /// `/verify`) go to `tx`; lines typed are kept in `history` if given.
    pub fn start(
        tx: mpsc::Sender<Input>,
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
        let (queue, queued) = std_mpsc::sync_channel(PRINT_QUEUE);
        let (done, printed) = std_mpsc::sync_channel(1);
        thread::Builder::new()
            .name("printer".into())
            .spawn(move || print_loop(Box::new(printer), queued, done))?;
        thread::spawn(move || edit_loop(editor, tx, history));
        Ok(Terminal {
            queue: Some(queue),
            printed,
            missed: 0,
            saved,
            style,
        })
    }

    /// Queues a line for the printer thread without waiting. When the queue is
    /// full the line is counted as missed, and the count is shown as soon as
    /// there is room again.
    fn show(&mut self, shown: Shown) {
        let Some(queue) = &self.queue else {
            shown.write_direct();
            return;
        };
        if self.missed > 0 {
            let notice = Shown::Status(self.style.status("-- ", &missed_notice(self.missed)));
            if queue.try_send(notice).is_err() {
                self.missed += 1;
                return;
            }
            self.missed = 0;
        }
        match queue.try_send(shown) {
            Ok(()) => {}
            Err(std_mpsc::TrySendError::Full(_)) => self.missed += 1,
            // The printer thread is gone: write directly, as before it existed.
            Err(std_mpsc::TrySendError::Disconnected(shown)) => {
                self.queue = None;
                shown.write_direct();
            }
        }
    }

    /// Puts the terminal back as it was before the editor started, so the process
    /// can exit while the editor thread still waits for a key.
    pub fn restore(&mut self) {
        // Let the printer thread hand over what is queued (for a bounded time:
        // a stalled terminal must not keep the process from exiting).
        if self.queue.take().is_some() {
            let _ = self.printed.recv_timeout(PRINT_FLUSH_TIMEOUT);
        }
        // The editor thread draws what the printer handed over; give it a moment
        // so the last received lines are on screen before the terminal changes mode.
        thread::sleep(Duration::from_millis(100));
        if let Some(saved) = &self.saved {
            // SAFETY: `saved` came from tcgetattr on the same descriptor.
            unsafe {
                libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved);
            }
        }
        eprintln!();
        if self.missed > 0 {
            eprintln!("-- {}", missed_notice(self.missed));
            self.missed = 0;
        }
    }
}

impl Output for Terminal {
    fn incoming(&mut self, name: &str, text: &str) {
        let line = self.style.incoming(name, text);
        self.show(Shown::Incoming(line));
    }

    fn status(&mut self, message: &str) {
        let line = self.style.status("-- ", message);
        self.show(Shown::Status(line));
    }
}

fn save_termios() -> Option<libc::termios> {
    // SAFETY: termios is plain old data; tcgetattr fills it or fails.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a termios for the duration of the call.
    let rc = unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) };
    (rc == 0).then_some(t)
}

fn edit_loop(mut editor: DefaultEditor, tx: mpsc::Sender<Input>, history: Option<PathBuf>) {
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
                    Typed::Verify => Input::Verify,
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
                    Typed::Save(name) => Input::Save(name),
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
    fn status_lines_are_sanitised_but_keep_their_line_breaks() {
        let plain = Style::default();
        assert_eq!(
            plain.status("-- ", "a\x1b]0;owned\x07\nb\u{202E}c\r\nd"),
            "-- a\u{FFFD}]0;owned\u{FFFD}\nb\u{FFFD}c\nd"
        );
        assert_eq!(sanitize_lines("one\ntwo\n"), "one\ntwo\n");
        assert_eq!(sanitize_lines("x\ty\u{2029}"), "x y\u{FFFD}");
    }

    #[test]
    fn missed_lines_are_counted_in_words() {
        assert_eq!(
            missed_notice(1),
            "1 line not shown: the terminal did not keep up"
        );
        assert_eq!(
            missed_notice(7),
            "7 lines not shown: the terminal did not keep up"
        );
    }

    /// A printer whose terminal is stalled until `stalled` says otherwise (or
    /// closes).
    struct StalledPrinter {
        stalled: Option<std_mpsc::Receiver<()>>,
        printed: std_mpsc::Sender<String>,
    }

    impl ExternalPrinter for StalledPrinter {
        fn print(&mut self, msg: String) -> rustyline::Result<()> {
            if let Some(stalled) = self.stalled.take() {
                let _ = stalled.recv();
            }
            let _ = self.printed.send(msg);
            Ok(())
        }
    }

    #[test]
    fn a_stalled_terminal_does_not_block_the_chat_and_nothing_goes_missing_unsaid() {
        let (wake_up, stalled) = std_mpsc::channel();
        let (printed_tx, printed) = std_mpsc::channel();
        let printer = StalledPrinter {
            stalled: Some(stalled),
            printed: printed_tx,
        };
        let (queue, queued) = std_mpsc::sync_channel(PRINT_QUEUE);
        let (done, flushed) = std_mpsc::sync_channel(1);
        thread::spawn(move || print_loop(Box::new(printer), queued, done));
        let mut term = Terminal {
            queue: Some(queue),
            printed: flushed,
            missed: 0,
            saved: None,
            style: Style::default(),
        };
        // The first line is taken by the printer, which then stalls; the queue
        // fills, then lines are counted. None of this waits.
        let started = std::time::Instant::now();
        let sent = PRINT_QUEUE + 10;
        for i in 0..sent {
            term.incoming("bob", &format!("line {i}"));
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            term.missed > 0 && term.missed < 20,
            "missed {}",
            term.missed
        );
        let missed = term.missed;
        // The terminal wakes up: everything queued is shown, in order, then the
        // count of what was not.
        wake_up.send(()).expect("the printer waits");
        let shown = sent as u64 - missed;
        for i in 0..shown {
            let line = printed
                .recv_timeout(Duration::from_secs(5))
                .expect("a shown line");
            assert_eq!(line, format!("bob: line {i}\n"));
        }
        term.status("after");
        let notice = printed
            .recv_timeout(Duration::from_secs(5))
            .expect("notice");
        assert_eq!(notice, format!("-- {}\n", missed_notice(missed)));
        let after = printed.recv_timeout(Duration::from_secs(5)).expect("after");
        assert_eq!(after, "-- after\n");
        // Leaving waits (briefly) for the queue to drain.
        term.restore();
        assert!(term.queue.is_none());
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
        assert_eq!(parse_typed("/save  alice "), Typed::Save("alice".into()));
        assert!(matches!(parse_typed("/save"), Typed::Usage(_)));
        assert!(matches!(parse_typed("/quit now"), Typed::Usage(_)));
        assert_eq!(parse_typed("//etc/hosts"), Typed::Send("/etc/hosts".into()));
        assert_eq!(
            parse_typed(" leading space"),
            Typed::Send(" leading space".into())
        );
    }
}

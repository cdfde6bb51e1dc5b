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
  /help      show this help
  /verify    show the words to compare with the other side: if they differ,
             someone is intercepting the chat
  /quit      say goodbye and leave (also Ctrl-D or Ctrl-C)
  //text     send a line that starts with '/'
anything else is sent to the other side as one line";

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
    match line.trim_end() {
        "/quit" | "/exit" => Typed::Quit,
        "/help" | "/?" => Typed::Help,
        "/verify" => Typed::Verify,
        cmd if cmd.starts_with('/') => {
            Typed::Unknown(cmd.split_whitespace().next().unwrap_or(cmd).to_owned())
        }
        _ => Typed::Send(line.to_owned()),
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

/// Output for pipes: `NAME: TEXT` lines on stdout, status on stderr.
pub struct LinesOutput;

impl Output for LinesOutput {
    fn incoming(&mut self, name: &str, text: &str) {
        let mut out = io::stdout().lock();
        // A closed stdout (the reader went away) is not a reason to stop the chat.
        let _ = writeln!(
            out,
            "{}: {}",
            sanitize_for_terminal(name),
            sanitize_for_terminal(text)
        );
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
        LinesOutput.incoming(name, text);
    }

    fn status(&mut self, message: &str) {
        eprintln!("{message}");
    }
}

/// The interactive terminal: a line editor thread and its external printer.
pub struct Terminal {
    printer: Box<dyn ExternalPrinter + Send>,
    saved: Option<libc::termios>,
}

impl Terminal {
    /// Starts the line editor; typed lines go to `tx`; `/verify` shows
    /// `verification`.
    pub fn start(tx: mpsc::Sender<Input>, verification: String) -> io::Result<Terminal> {
        let saved = save_termios();
        let mut editor = DefaultEditor::new().map_err(io::Error::other)?;
        let printer = editor.create_external_printer().map_err(io::Error::other)?;
        thread::spawn(move || edit_loop(editor, tx, &verification));
        Ok(Terminal {
            printer: Box::new(printer),
            saved,
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
        let line = format!(
            "{}: {}",
            sanitize_for_terminal(name),
            sanitize_for_terminal(text)
        );
        if self.printer.print(line.clone()).is_err() {
            println!("{line}");
        }
    }

    fn status(&mut self, message: &str) {
        let line = format!("-- {message}");
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

fn edit_loop(mut editor: DefaultEditor, tx: mpsc::Sender<Input>, verification: &str) {
    println!("type a line and press Enter to send it; /help for commands");
    loop {
        let input = match editor.readline("> ") {
            Ok(line) => {
                match parse_typed(&line) {
                    Typed::Empty => continue,
                    Typed::Help => {
                        println!("{HELP}");
                        continue;
                    }
                    Typed::Verify => {
                        println!("verification: {verification}  (the other side must see the same words)");
                        continue;
                    }
                    Typed::Unknown(cmd) => {
                        println!("unknown command {cmd}: /help lists the commands (start with // to send a line beginning with /)");
                        continue;
                    }
                    Typed::Quit => Input::Quit,
                    Typed::Send(text) => {
                        let _ = editor.add_history_entry(line.as_str());
                        Input::Line(text)
                    }
                }
            }
            Err(ReadlineError::Interrupted) => Input::Interrupted,
            Err(_) => Input::Quit,
        };
        let last = !matches!(input, Input::Line(_));
        if tx.blocking_send(input).is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_lines() {
        assert_eq!(parse_typed("hello"), Typed::Send("hello".into()));
        assert_eq!(parse_typed("  "), Typed::Empty);
        assert_eq!(parse_typed("/quit"), Typed::Quit);
        assert_eq!(parse_typed("/help"), Typed::Help);
        assert_eq!(parse_typed("/verify"), Typed::Verify);
        assert_eq!(parse_typed("/frob x"), Typed::Unknown("/frob".into()));
        assert_eq!(parse_typed("//etc/hosts"), Typed::Send("/etc/hosts".into()));
        assert_eq!(
            parse_typed(" leading space"),
            Typed::Send(" leading space".into())
        );
    }
}

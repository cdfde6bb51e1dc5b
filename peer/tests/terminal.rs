//! The interactive chat in a real terminal: `peer` runs inside tmux, the test types
//! with `send-keys` and reads the screen with `capture-pane`, while the other side is
//! a piped `peer` the test drives directly.

mod common;

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use punchline_testkit::TestRendezvous;

/// A tmux session running one command; killed when dropped.
struct Tmux {
    session: String,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        let session = format!("punchline-test-{}", std::process::id());
        let ok = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                &session,
                "-x",
                "120",
                "-y",
                "30",
                command,
            ])
            .env_remove("TMUX")
            .status()
            .expect("run tmux")
            .success();
        assert!(ok, "tmux new-session failed");
        Tmux { session }
    }

    fn keys(&self, keys: &[&str]) {
        let ok = Command::new("tmux")
            .args(["send-keys", "-t", &self.session])
            .args(keys)
            .status()
            .expect("tmux send-keys")
            .success();
        assert!(ok);
    }

    fn screen(&self) -> Vec<String> {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect()
    }

    /// Waits until `check` accepts the screen; returns it.
    fn wait_for(&self, what: &str, check: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let screen = self.screen();
            if check(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "screen never showed {what}:\n{}",
                screen.join("\n")
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The screen with its colours, as escape sequences.
    fn screen_with_colours(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-e", "-p", "-t", &self.session])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_text(&self, needle: &str) -> Vec<String> {
        self.wait_for(needle, |s| s.iter().any(|l| l.contains(needle)))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.session])
            .status();
    }
}

fn last_nonempty(screen: &[String]) -> &str {
    screen
        .iter()
        .rev()
        .find(|l| !l.is_empty())
        .map_or("", |l| l.as_str())
}

fn tmux_available() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn terminal_chat_keeps_the_typed_line_intact_and_has_history_and_commands() {
    if !tmux_available() {
        assert!(
            std::env::var_os("PUNCHLINE_REQUIRE_LAB").is_none(),
            "tmux is required (PUNCHLINE_REQUIRE_LAB is set) but not installed"
        );
        eprintln!("SKIPPED: terminal test needs tmux (apt-get install tmux)");
        return;
    }
    let rv = TestRendezvous::start();
    let peer = env!("CARGO_BIN_EXE_peer");
    let data = std::env::temp_dir().join(format!("punchline-tty-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let term = Tmux::start(&format!(
        "env -u NO_COLOR XDG_DATA_HOME={} XDG_CONFIG_HOME={}/config {peer} --server {} --name alice --no-lan 8-tty-check; echo EXIT=$?; sleep 30",
        data.display(),
        data.display(),
        rv.addr()
    ));
    term.wait_text("waiting for the other side");
    let mut bob = Peer::spawn(rv.addr(), "bob", "8-tty-check", &[]);
    bob.wait_stderr("connected to alice");
    term.wait_text("connected to bob");
    term.wait_for("the prompt", |s| last_nonempty(s) == ">");

    // Lines arrive while alice is half-way through typing: they appear above, and
    // her line is redrawn intact below them.
    term.keys(&["half typed"]);
    term.wait_for("the typed text", |s| last_nonempty(s) == "> half typed");
    bob.send("incoming one\nincoming two\n");
    let screen = term.wait_text("bob: incoming two");
    assert!(
        screen.iter().any(|l| l == "bob: incoming one"),
        "{}",
        screen.join("\n")
    );
    assert_eq!(
        last_nonempty(&screen),
        "> half typed",
        "{}",
        screen.join("\n")
    );
    term.keys(&["Enter"]);
    assert_eq!(bob.recv(), "alice: half typed");
    // The other's name is in colour on a terminal.
    let coloured = term.screen_with_colours();
    // (tmux re-renders the escapes: bold and cyan come back as \e[1m\e[36m.)
    assert!(
        coloured.contains("\x1b[36mbob"),
        "no colour on the name:\n{coloured:?}"
    );
    // Typed lines are kept in a history file only the user can read.
    let history = data.join("punchline/history");
    let kept = std::fs::read_to_string(&history).unwrap_or_default();
    assert!(kept.contains("half typed"), "history file: {kept:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&history)
        .expect("history")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "history file mode {mode:o}");

    // History: Up brings the last line back.
    term.keys(&["Up"]);
    term.wait_for("the recalled line", |s| last_nonempty(s) == "> half typed");
    term.keys(&["C-u", "/help", "Enter"]);
    term.wait_text("/quit        say goodbye and leave");
    term.keys(&["/verify", "Enter"]);
    let words = bob.wait_stderr("encrypted; code confirmed");
    let words = words
        .rsplit(": ")
        .next()
        .expect("words")
        .trim_end_matches(')')
        .to_owned();
    term.wait_text(&format!("verification: {words}"));
    term.keys(&["/nonsense", "Enter"]);
    term.wait_text("unknown command /nonsense");
    term.keys(&["   ", "Enter"]);
    term.wait_text("empty line: nothing sent");
    term.keys(&["/nick", "Enter"]);
    term.wait_text("usage: /nick NAME");

    // /save: bob becomes a contact, kept in alice's config directory.
    term.keys(&["/save", "Enter"]);
    term.wait_text("usage: /save NAME");
    term.keys(&["/save bob", "Enter"]);
    term.wait_text("saved as contact bob (key ");
    let contacts = std::fs::read_to_string(data.join("config/punchline/contacts.toml"))
        .expect("contacts file");
    assert!(contacts.contains("name = \"bob\""), "{contacts}");

    // /nick: the other side is told, and later lines carry the new name.
    term.keys(&["/nick Ada", "Enter"]);
    term.wait_text("you are now known as Ada");
    bob.wait_stderr("alice is now known as Ada");
    term.keys(&["renamed", "Enter"]);
    assert_eq!(bob.recv(), "Ada: renamed");
    bob.send("/nick has no meaning in a piped line\n");
    term.wait_text("bob: /nick has no meaning in a piped line");

    // /info: the path, the addresses, the RTT, the NAT findings, encryption, traffic.
    term.keys(&["/info", "Enter"]);
    // The lines are printed one by one: wait for the last one checked.
    let screen = term.wait_text("-- names        you are Ada");
    let info = screen.join("\n");
    for needle in [
        "-- path         direct TCP link",
        "-- addresses    127.0.0.1:",
        "-- rtt          ",
        "-- you          public address 127.0.0.1:",
        "-- encryption   Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s",
        "lines and",
        "-- names        you are Ada, the other side is bob",
    ] {
        assert!(info.contains(needle), "no {needle:?} in /info:\n{info}");
    }

    // Several lines arriving at once (a paste) are sent as separate lines, in order.
    term.keys(&["p1", "Enter", "p2", "Enter", "p3", "Enter"]);
    assert_eq!(bob.recv(), "Ada: p1");
    assert_eq!(bob.recv(), "Ada: p2");
    assert_eq!(bob.recv(), "Ada: p3");

    // Text from the other side cannot drive the terminal.
    bob.send("\x1b[2Jgotcha\n");
    term.wait_text("bob: \u{FFFD}[2Jgotcha");

    // /quit: goodbye, bob is told, both exit 0, the terminal is usable again.
    term.keys(&["/quit", "Enter"]);
    term.wait_text("EXIT=0");
    assert!(bob.wait().success());
    bob.wait_stderr("Ada left");
    let _ = std::fs::remove_dir_all(&data);
}

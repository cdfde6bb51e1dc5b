//! Contacts, with real `peer` processes and a real rendezvous on loopback:
//! pair once with a code and save each other, then meet again with `@NAME`
//! and no code; impostors and changed keys are refused on both sides; the
//! rendezvous connection carries neither names nor keys; broken contact files
//! are errors naming them, never replaced. Each side has its own config
//! directory (`XDG_CONFIG_HOME`), as two users on two hosts would.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use common::*;
use punchline_peer::contacts::{Book, Identity, CONTACTS_FILE, IDENTITY_FILE};
use punchline_testkit::TestRendezvous;

/// A peer with its own config directory.
fn spawn(rv: &TestRendezvous, name: &str, arg: &str, config: &Path, extra: &[&str]) -> Peer {
    let mut cmd = peer_command(rv.addr(), name, arg, extra);
    cmd.env("XDG_CONFIG_HOME", config);
    Peer::spawn_command(cmd, name)
}

/// The identity kept in a side's config directory.
fn identity(config: &Path) -> Identity {
    Identity::load_or_create(&config.join("punchline"))
        .expect("identity")
        .0
}

/// Alice and Bob chat once with `code`, each saving the other (`--save`);
/// returns their config directories.
fn pair_and_save(rv: &TestRendezvous, code: &str) -> (PathBuf, PathBuf) {
    let (ca, cb) = (fresh_config("alice"), fresh_config("bob"));
    let mut a = spawn(rv, "alice", code, &ca, &["--save", "bob"]);
    a.wait_stderr("waiting for the other side");
    let mut b = spawn(rv, "bob", code, &cb, &["--save", "alice"]);
    a.wait_stderr("saved as contact bob");
    b.wait_stderr("saved as contact alice");
    a.send("first chat\n");
    assert_eq!(b.recv(), "alice: first chat");
    a.close_stdin();
    assert!(a.wait().success());
    assert!(b.wait().success());
    // Each kept the other's identity key, and the same pairing secret.
    let (book_a, book_b) = (
        Book::load(&ca.join("punchline")).expect("alice's contacts"),
        Book::load(&cb.join("punchline")).expect("bob's contacts"),
    );
    let (bob, alice) = (
        book_a.get("bob").expect("alice saved bob"),
        book_b.get("alice").expect("bob saved alice"),
    );
    assert_eq!(bob.key, identity(&cb).public());
    assert_eq!(alice.key, identity(&ca).public());
    assert_eq!(bob.pairing, alice.pairing);
    (ca, cb)
}

#[test]
fn saved_contacts_meet_again_with_no_code() {
    let rv = TestRendezvous::start();
    let (ca, cb) = pair_and_save(&rv, "21-apple-river");

    let mut a = spawn(&rv, "alice", "@bob", &ca, &[]);
    // A line typed before the link rides in the first handshake message, as
    // in a chat with a code.
    a.send("hello again\n");
    a.wait_stderr("waiting for bob");
    let mut b = spawn(&rv, "bob", "@alice", &cb, &[]);
    a.wait_stderr("this is bob: the key you saved");
    b.wait_stderr("this is alice: the key you saved");
    assert_eq!(b.recv(), "alice: hello again");
    b.send("hi alice\n");
    assert_eq!(a.recv(), "bob: hi alice");
    a.close_stdin();
    assert!(a.wait().success());
    assert!(b.wait().success());
    // Both sides still hold one contact each (nothing was re-saved).
    assert_eq!(
        Book::load(&ca.join("punchline"))
            .expect("book")
            .contacts
            .len(),
        1
    );
}

#[test]
fn the_old_code_does_not_lead_to_a_contacts_chat() {
    let rv = TestRendezvous::start();
    let code = "22-apple-river";
    let (ca, _cb) = pair_and_save(&rv, code);
    // Alice waits for Bob as a contact; whoever knows the old code (and so
    // could have watched the first chat's meeting) joins with it.
    let mut a = spawn(&rv, "alice", "@bob", &ca, &[]);
    a.send("for bob only\n");
    a.wait_stderr("waiting for bob");
    let mallory = fresh_config("mallory");
    let mut m = spawn(&rv, "mallory", code, &mallory, &[]);
    m.wait_stderr("waiting for the other side");
    // They are in different rooms: neither meets the other.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(m.try_recv(Duration::from_millis(100)), None);
    assert_eq!(a.try_recv(Duration::from_millis(100)), None);
    drop(m);
    drop(a);
    // Nor does a contact chat with a code: a stranger with Alice's room
    // would need the pairing secret, which never travels.
}

#[test]
fn an_impostor_with_another_identity_is_refused_on_both_sides() {
    let rv = TestRendezvous::start();
    let (ca, cb) = pair_and_save(&rv, "23-apple-river");
    // Carol has a copy of Bob's contacts file (the pairing, Alice's key) but
    // her own identity key.
    let carol = fresh_config("carol");
    std::fs::create_dir_all(carol.join("punchline")).expect("dir");
    std::fs::copy(
        cb.join("punchline").join(CONTACTS_FILE),
        carol.join("punchline").join(CONTACTS_FILE),
    )
    .expect("copy");
    let mut a = spawn(&rv, "alice", "@bob", &ca, &[]);
    a.send("never for carol\n");
    a.wait_stderr("waiting for bob");
    let mut c = spawn(&rv, "carol", "@alice", &carol, &[]);
    c.send("carol pretending\n");
    for (p, expected) in [(&mut a, "bob"), (&mut c, "alice")] {
        assert!(!p.wait().success(), "{} must refuse", p.name());
        let said = p.wait_stderr("peer: ");
        assert!(
            said.contains(&format!(
                "REFUSED: whoever answered as {expected} is not the {expected} you saved"
            )),
            "{said}"
        );
        assert!(
            said.contains(&format!("peer contacts forget {expected}")),
            "{said}"
        );
    }
    assert_eq!(a.rest_of_stdout(), Vec::<String>::new());
    assert_eq!(c.rest_of_stdout(), Vec::<String>::new());
}

#[test]
fn a_changed_key_is_refused_with_what_to_do() {
    let rv = TestRendezvous::start();
    let (ca, cb) = pair_and_save(&rv, "24-apple-river");
    // Bob loses his identity (a new one is made) but keeps his contacts.
    std::fs::remove_file(cb.join("punchline").join(IDENTITY_FILE)).expect("remove");
    let mut a = spawn(&rv, "alice", "@bob", &ca, &[]);
    a.wait_stderr("waiting for bob");
    let mut b = spawn(&rv, "bob", "@alice", &cb, &[]);
    let warned = b.wait_stderr("a new identity key was made");
    assert!(
        warned.contains("your contacts know the old one"),
        "{warned}"
    );
    assert!(!a.wait().success());
    let said = a.wait_stderr("peer: ");
    assert!(
        said.contains("REFUSED: whoever answered as bob is not the bob you saved")
            && said.contains("set up punchline again")
            && said.contains("peer contacts forget bob"),
        "{said}"
    );
    assert!(!b.wait().success());
    b.wait_stderr("REFUSED: whoever answered as alice");
}

#[test]
fn an_unknown_contact_or_a_broken_contacts_file_is_a_clear_error() {
    let rv = TestRendezvous::start();
    let config = fresh_config("broken");
    let mut p = spawn(&rv, "alice", "@nobody", &config, &[]);
    assert!(!p.wait().success());
    let said = p.wait_stderr("peer: ");
    assert!(said.contains("no contact named \"nobody\""), "{said}");

    let file = config.join("punchline").join(CONTACTS_FILE);
    std::fs::create_dir_all(file.parent().expect("dir")).expect("dir");
    let garbage = "version = 1\n[[contact]]\nname = \"bob\"\nkey = \"not hex\"\n";
    std::fs::write(&file, garbage).expect("write");
    let mut p = spawn(&rv, "alice", "@bob", &config, &[]);
    assert!(!p.wait().success());
    let said = p.wait_stderr("peer: ");
    assert!(
        said.contains(&file.display().to_string()) && said.contains("never replaces"),
        "{said}"
    );
    // `peer contacts` says the same, and saving after a chat does not
    // overwrite it either.
    let out = contacts_cmd(&config, &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&file.display().to_string()));
    assert_eq!(std::fs::read_to_string(&file).expect("kept"), garbage);
}

fn contacts_cmd(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_peer"))
        .arg("contacts")
        .args(args)
        .env("XDG_CONFIG_HOME", config)
        .output()
        .expect("run peer contacts")
}

#[test]
fn contacts_are_listed_renamed_and_forgotten() {
    let rv = TestRendezvous::start();
    let (ca, _cb) = pair_and_save(&rv, "25-apple-river");
    let list = contacts_cmd(&ca, &[]);
    assert!(list.status.success());
    let text = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        text.contains("your key: ") && text.contains("@bob"),
        "{text}"
    );
    assert!(contacts_cmd(&ca, &["rename", "bob", "robert"])
        .status
        .success());
    let text = String::from_utf8_lossy(&contacts_cmd(&ca, &["list"]).stdout).into_owned();
    assert!(
        text.contains("@robert") && !text.contains("@bob "),
        "{text}"
    );
    let forgot = contacts_cmd(&ca, &["forget", "robert"]);
    assert!(forgot.status.success());
    let text = String::from_utf8_lossy(&contacts_cmd(&ca, &[]).stdout).into_owned();
    assert!(text.contains("no contacts yet"), "{text}");
    let again = contacts_cmd(&ca, &["forget", "robert"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no contact named"));
    // The files are the user's only.
    use std::os::unix::fs::PermissionsExt;
    for f in [CONTACTS_FILE, IDENTITY_FILE] {
        let mode = std::fs::metadata(ca.join("punchline").join(f))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} readable by others: {mode:o}");
    }
}

#[test]
fn the_rendezvous_sees_neither_names_nor_keys_of_contacts() {
    let rv = TestRendezvous::start();
    let (ca, cb) = pair_and_save(&rv, "26-walnut-zebra");
    // Only the second chat, the contacts', is captured, and only the
    // rendezvous connections (main and probe port).
    let filter = format!(
        "tcp and (port {} or port {})",
        rv.addr().port(),
        rv.addr().port() + 1
    );
    let Some(capture) = Capture::start(&filter) else {
        return;
    };
    let mut a = spawn(&rv, "frobnitza", "@bob", &ca, &[]);
    a.wait_stderr("waiting for bob");
    let mut b = spawn(&rv, "gazumpb", "@alice", &cb, &[]);
    b.wait_stderr("this is alice");
    a.send("xyzzy line\n");
    // Shown under the name Bob saved her as.
    assert_eq!(b.recv(), "alice: xyzzy line");
    a.close_stdin();
    assert!(a.wait().success());
    assert!(b.wait().success());
    let captured = capture.finish();
    // The capture saw the meeting: two hellos and the goes at least.
    assert!(
        captured.len() > 1024,
        "capture is empty ({} bytes)",
        captured.len()
    );
    for name in ["frobnitza", "gazumpb", "alice", "bob", "xyzzy"] {
        assert!(
            !holds(&captured, name.as_bytes()),
            "{name:?} reached the rendezvous"
        );
    }
    let pairing = Book::load(&ca.join("punchline"))
        .expect("book")
        .get("bob")
        .expect("bob")
        .pairing;
    for (what, bytes) in [
        ("alice's key", identity(&ca).public()),
        ("bob's key", identity(&cb).public()),
        ("the pairing", pairing),
    ] {
        assert!(!holds(&captured, &bytes), "{what} reached the rendezvous");
        // Nor its first half, should something carry a part.
        assert!(
            !holds(&captured, &bytes[..16]),
            "part of {what} reached the rendezvous"
        );
    }
}

/// Saving a contact again, in a contact's chat, is refused (its pairing
/// stays the one both sides hold), and the two still meet afterwards; the
/// contact shows under the name it was saved as, whatever it calls itself.
#[test]
fn a_contact_saved_again_keeps_its_pairing_and_its_saved_name() {
    let rv = TestRendezvous::start();
    let (ca, cb) = pair_and_save(&rv, "27-apple-river");
    let before = Book::load(&ca.join("punchline")).expect("book");
    let mut a = spawn(&rv, "alice", "@bob", &ca, &["--save", "bob"]);
    a.wait_stderr("waiting for bob");
    let mut b = spawn(&rv, "carol", "@alice", &cb, &[]);
    a.wait_stderr("connected to bob:");
    a.wait_stderr("(bob calls itself carol)");
    let refused = a.wait_stderr("not saved: ");
    assert!(refused.contains("bob is already your contact"), "{refused}");
    b.send("hi\n");
    assert_eq!(a.recv(), "bob: hi");
    a.close_stdin();
    assert!(a.wait().success());
    assert!(b.wait().success());
    let after = Book::load(&ca.join("punchline")).expect("book");
    assert_eq!(
        after.get("bob").expect("bob").pairing,
        before.get("bob").expect("bob").pairing
    );
    // They still meet.
    let mut a = spawn(&rv, "alice", "@bob", &ca, &[]);
    a.wait_stderr("waiting for bob");
    let mut b = spawn(&rv, "bob", "@alice", &cb, &[]);
    a.wait_stderr("this is bob");
    b.wait_stderr("this is alice");
    a.close_stdin();
    assert!(a.wait().success());
    assert!(b.wait().success());
}

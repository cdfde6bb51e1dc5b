//! Contacts: the other sides a user chats with again and again, met with no
//! code.
//!
//! - Each user has a long-term identity key (X25519), made on first use and
//!   kept in `identity.toml` in the config directory
//!   (`$XDG_CONFIG_HOME/punchline`, else `~/.config/punchline`). Its public
//!   half travels, encrypted, in every chat's handshake
//!   ([`punchline_proto::Introduction::identity`]).
//! - After a chat, either side may keep the other (`/save NAME`, `--save
//!   NAME`): a contact holds the other's public key and a pairing secret
//!   derived from the chat's secret ([`crate::secure::Secret::pairing`]),
//!   never the code. Both sides derive the same pairing secret; each keeps
//!   the other under a name of its own choosing, in `contacts.toml`.
//! - `peer @NAME` meets that contact in a room at the rendezvous derived from
//!   the pairing secret and the current hour ([`room_epoch`]), so the
//!   rendezvous cannot tie it to names and sees a new room every hour; the
//!   first link's handshake is Noise `KKpsk0`: both identity keys and the
//!   pairing secret ([`crate::secure::Secret::contact`]).
//!
//! The files are the user's only (mode 0600, directory 0700), carry a format
//! version, are written whole to a temporary file and renamed over the old
//! one, under a lock so that two peers saving at once lose nothing. A file
//! that cannot be read or understood is an error naming it; it is never
//! replaced.

use std::fs;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::error::PeerError;

/// Version of the identity and contacts files' format.
pub const FORMAT_VERSION: u32 = 1;

/// The identity file's name, in the config directory.
pub const IDENTITY_FILE: &str = "identity.toml";

/// The contacts file's name, in the config directory.
pub const CONTACTS_FILE: &str = "contacts.toml";

/// The lock taken while the contacts file is read, changed and written.
const LOCK_FILE: &str = "contacts.lock";

/// Most characters in a contact's name.
pub const MAX_CONTACT_NAME: usize = 32;

/// How long a contact's room at the rendezvous stays the same. A peer
/// waiting when it changes meets again in the new one.
pub const ROOM_EPOCH: Duration = Duration::from_secs(3600);

/// The config directory: `$XDG_CONFIG_HOME/punchline`, else
/// `$HOME/.config/punchline`.
pub fn config_dir() -> Result<PathBuf, PeerError> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".config"),
            None => {
                return Err(PeerError::Contacts(
                    "no config directory: neither XDG_CONFIG_HOME nor HOME is set".into(),
                ))
            }
        },
    };
    Ok(base.join("punchline"))
}

/// A contact's name: 1 to [`MAX_CONTACT_NAME`] letters, digits, `-`, `_` or
/// `.`, not starting with `.` or `-` (it is typed after `@` on the command
/// line).
pub fn validate_contact_name(name: &str) -> Result<(), PeerError> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_CONTACT_NAME
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(PeerError::Usage(format!(
            "invalid contact name {name:?}: use 1 to {MAX_CONTACT_NAME} letters, digits, '-', '_' or '.', not starting with '.' or '-'"
        )))
    }
}

/// The room epoch of `now`: the number of [`ROOM_EPOCH`]s since 1970.
pub fn room_epoch(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / ROOM_EPOCH.as_secs()
}

/// How long from `now` until the next room epoch starts.
pub fn until_next_epoch(now: SystemTime) -> Duration {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let next = (room_epoch(now) + 1) * ROOM_EPOCH.as_secs();
    Duration::from_secs(next).saturating_sub(since)
}

/// A short, readable fingerprint of a public key (the first 8 bytes of its
/// SHA-256, in hex groups), to tell keys apart in messages and listings.
pub fn fingerprint(key: &[u8; 32]) -> String {
    let digest = sha2::Sha256::digest(key);
    digest[..8].chunks(2).map(hex).collect::<Vec<_>>().join(":")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// This user's long-term identity key.
#[derive(Clone)]
pub struct Identity {
    secret: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", fingerprint(&self.public))
    }
}

#[derive(Serialize, Deserialize)]
struct IdentityFile {
    version: u32,
    secret: String,
}

impl Identity {
    /// The identity with this secret key.
    pub fn from_secret(secret: [u8; 32]) -> Identity {
        let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(secret).to_bytes();
        Identity { secret, public }
    }

    /// A new random identity.
    pub fn generate() -> Result<Identity, PeerError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| {
            PeerError::io(
                "no randomness for an identity key",
                std::io::Error::other(e),
            )
        })?;
        Ok(Identity::from_secret(secret))
    }

    /// The public key, which the other side of a chat learns.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The secret key (the Noise static key of a contact's handshake).
    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The identity kept in `dir`, made and kept there if there is none yet;
    /// with whether it was just made. A file that cannot be read or
    /// understood is an error, never replaced.
    pub fn load_or_create(dir: &Path) -> Result<(Identity, bool), PeerError> {
        let path = dir.join(IDENTITY_FILE);
        if let Some(identity) = Self::load(&path)? {
            return Ok((identity, false));
        }
        let identity = Identity::generate()?;
        let text = format!(
            "# punchline identity: your long-term key. Whoever has this file can pass for you\n\
             # with your contacts. Keep it private; never share it.\n{}",
            toml::to_string(&IdentityFile {
                version: FORMAT_VERSION,
                secret: hex(&identity.secret),
            })
            .map_err(|e| PeerError::Contacts(format!("encoding the identity: {e}")))?
        );
        // Made only if still absent: two peers starting at once keep one.
        if write_new(dir, &path, &text)? {
            Ok((identity, true))
        } else {
            let identity = Self::load(&path)?.ok_or_else(|| {
                file_error(&path, "vanished just after another program made it".into())
            })?;
            Ok((identity, false))
        }
    }

    fn load(path: &Path) -> Result<Option<Identity>, PeerError> {
        let Some(text) = read_if_present(path)? else {
            return Ok(None);
        };
        let file: IdentityFile =
            toml::from_str(&text).map_err(|e| not_understood(path, &text, &e))?;
        check_version(path, file.version)?;
        let secret = unhex32(&file.secret)
            .ok_or_else(|| file_error(path, "its secret is not 64 hex digits".into()))?;
        Ok(Some(Identity::from_secret(secret)))
    }
}

/// Another user kept to chat with again with no code.
#[derive(Clone, PartialEq, Eq)]
pub struct Contact {
    /// What this user calls them (`peer @NAME`).
    pub name: String,
    /// Their identity's public key.
    pub key: [u8; 32],
    /// The pairing secret, from the chat in which they were saved.
    pub pairing: [u8; 32],
    /// When they were saved, in seconds since 1970.
    pub saved: u64,
}

impl std::fmt::Debug for Contact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Contact({}, {})", self.name, fingerprint(&self.key))
    }
}

#[derive(Serialize, Deserialize)]
struct ContactsFile {
    version: u32,
    #[serde(default, rename = "contact")]
    contacts: Vec<ContactEntry>,
}

#[derive(Serialize, Deserialize)]
struct ContactEntry {
    name: String,
    key: String,
    pairing: String,
    saved: u64,
}

/// What can be saved after a chat: the other side's key and the pairing
/// secret both sides derive from the chat.
#[derive(Clone)]
pub struct Offer {
    /// The other side's identity key, from its handshake.
    pub key: [u8; 32],
    /// The pairing secret.
    pub pairing: [u8; 32],
}

impl std::fmt::Debug for Offer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Offer({})", fingerprint(&self.key))
    }
}

/// The contacts file's contents.
#[derive(Debug, Default)]
pub struct Book {
    /// The contacts, in the order saved.
    pub contacts: Vec<Contact>,
}

impl Book {
    /// The contacts kept in `dir` (none if there is no file yet).
    pub fn load(dir: &Path) -> Result<Book, PeerError> {
        let path = dir.join(CONTACTS_FILE);
        let Some(text) = read_if_present(&path)? else {
            return Ok(Book::default());
        };
        let file: ContactsFile =
            toml::from_str(&text).map_err(|e| not_understood(&path, &text, &e))?;
        check_version(&path, file.version)?;
        let mut contacts = Vec::with_capacity(file.contacts.len());
        for entry in file.contacts {
            let bad = |what: &str| file_error(&path, format!("contact {:?}: {what}", entry.name));
            validate_contact_name(&entry.name).map_err(|_| bad("not a valid name"))?;
            let key = unhex32(&entry.key).ok_or_else(|| bad("its key is not 64 hex digits"))?;
            let pairing = unhex32(&entry.pairing)
                .ok_or_else(|| bad("its pairing secret is not 64 hex digits"))?;
            if contacts.iter().any(|c: &Contact| c.name == entry.name) {
                return Err(bad("saved twice"));
            }
            contacts.push(Contact {
                name: entry.name,
                key,
                pairing,
                saved: entry.saved,
            });
        }
        Ok(Book { contacts })
    }

    /// The contact called `name`.
    pub fn get(&self, name: &str) -> Option<&Contact> {
        self.contacts.iter().find(|c| c.name == name)
    }

    /// Reads the book in `dir`, lets `change` change it, and writes it back
    /// if that succeeded, all under the contacts lock.
    pub fn update<T>(
        dir: &Path,
        change: impl FnOnce(&mut Book) -> Result<T, PeerError>,
    ) -> Result<T, PeerError> {
        make_dir(dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| file_error(&lock_path, format!("cannot open: {e}")))?;
        // SAFETY: flock on a descriptor this function owns; released when
        // `lock` is closed at the end of the function.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(file_error(&lock_path, format!("cannot lock: {e}")));
        }
        let mut book = Book::load(dir)?;
        let result = change(&mut book)?;
        book.write(dir)?;
        drop(lock);
        Ok(result)
    }

    fn write(&self, dir: &Path) -> Result<(), PeerError> {
        let file = ContactsFile {
            version: FORMAT_VERSION,
            contacts: self
                .contacts
                .iter()
                .map(|c| ContactEntry {
                    name: c.name.clone(),
                    key: hex(&c.key),
                    pairing: hex(&c.pairing),
                    saved: c.saved,
                })
                .collect(),
        };
        let text = format!(
            "# punchline contacts: whoever has this file and your identity can pass for you\n\
             # with these contacts. Keep it private. Change it with `peer contacts`.\n{}",
            toml::to_string(&file)
                .map_err(|e| PeerError::Contacts(format!("encoding the contacts: {e}")))?
        );
        write_replacing(dir, &dir.join(CONTACTS_FILE), &text)
    }

    /// Keeps `offer` as `name`. A name already used is refused: for another
    /// key (that key may have changed: the user must say so), and for the
    /// same key too (the contact holds an earlier chat's pairing, which the
    /// other side holds as well; replacing it on one side only would part
    /// the two). So is a key already saved under another name.
    pub fn save(&mut self, name: &str, offer: &Offer, now: SystemTime) -> Result<Saved, PeerError> {
        validate_contact_name(name)?;
        if let Some(other) = self
            .contacts
            .iter()
            .find(|c| c.key == offer.key && c.name != name)
        {
            return Err(PeerError::Contacts(format!(
                "this contact is already saved as {0:?}: use @{0}, or rename it with `peer contacts rename {0} {name}`",
                other.name
            )));
        }
        let saved = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        match self.contacts.iter_mut().find(|c| c.name == name) {
            Some(existing) if existing.key != offer.key => Err(PeerError::Contacts(format!(
                "a contact named {name:?} is already saved with another key ({}; this chat's is {}). \
                 If {name} set up punchline again, forget the old one first (`peer contacts forget {name}`) \
                 and save again; otherwise save under another name.",
                fingerprint(&existing.key),
                fingerprint(&offer.key)
            ))),
            Some(_) => Err(PeerError::Contacts(format!(
                "{name} is already your contact (`peer @{name}` meets them). To pair afresh from \
                 this chat, both of you forget the old contact (`peer contacts forget NAME`) and \
                 save again."
            ))),
            None => {
                self.contacts.push(Contact {
                    name: name.to_owned(),
                    key: offer.key,
                    pairing: offer.pairing,
                    saved,
                });
                Ok(Saved::New)
            }
        }
    }

    /// Renames a contact.
    pub fn rename(&mut self, old: &str, new: &str) -> Result<(), PeerError> {
        validate_contact_name(new)?;
        if self.get(new).is_some() {
            return Err(PeerError::Contacts(format!(
                "a contact named {new:?} already exists"
            )));
        }
        let contact = self
            .contacts
            .iter_mut()
            .find(|c| c.name == old)
            .ok_or_else(|| no_such_contact(old))?;
        contact.name = new.to_owned();
        Ok(())
    }

    /// Forgets a contact.
    pub fn forget(&mut self, name: &str) -> Result<Contact, PeerError> {
        let at = self
            .contacts
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| no_such_contact(name))?;
        Ok(self.contacts.remove(at))
    }
}

/// How [`Book::save`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// A new contact.
    New,
}

/// The error for a contact that is not in the book.
pub fn no_such_contact(name: &str) -> PeerError {
    PeerError::Contacts(format!(
        "no contact named {name:?}: `peer contacts` lists them; a contact is saved after a chat \
         with a code (`/save NAME` during it, or `--save NAME` when starting it)"
    ))
}

fn file_error(path: &Path, why: String) -> PeerError {
    PeerError::Contacts(format!(
        "{}: {why}. Fix or move the file away; punchline never replaces it.",
        path.display()
    ))
}

/// A file that does not parse, in one line: where and why.
fn not_understood(path: &Path, text: &str, e: &toml::de::Error) -> PeerError {
    let at = match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" at line {line}")
        }
        None => String::new(),
    };
    file_error(
        path,
        format!(
            "not understood{at}: {}",
            e.message().trim().replace('\n', " ")
        ),
    )
}

fn check_version(path: &Path, version: u32) -> Result<(), PeerError> {
    if version == FORMAT_VERSION {
        Ok(())
    } else {
        Err(file_error(
            path,
            format!(
                "format version {version}, where this punchline reads version {FORMAT_VERSION} \
                 (written by another release?)"
            ),
        ))
    }
}

fn read_if_present(path: &Path) -> Result<Option<String>, PeerError> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| file_error(path, "not text (UTF-8)".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_error(path, format!("cannot read: {e}"))),
    }
}

/// Makes `dir` (the user's only) if it does not exist.
fn make_dir(dir: &Path) -> Result<(), PeerError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| file_error(dir, format!("cannot make the directory: {e}")))
}

/// Writes `text` to a new temporary file beside `path` (the user's only),
/// flushed to disk; returns its path.
fn write_temp(dir: &Path, path: &Path, text: &str) -> Result<PathBuf, PeerError> {
    make_dir(dir)?;
    let mut tag = [0u8; 8];
    getrandom::fill(&mut tag)
        .map_err(|e| PeerError::io("no randomness", std::io::Error::other(e)))?;
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        hex(&tag)
    ));
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        // The mode above is masked by the umask; the file must be ours only.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temp);
        file_error(path, format!("cannot write: {e}"))
    })?;
    Ok(temp)
}

/// Replaces `path` with `text` at once (a reader sees the old file or the
/// new one, never a part).
fn write_replacing(dir: &Path, path: &Path, text: &str) -> Result<(), PeerError> {
    let temp = write_temp(dir, path, text)?;
    fs::rename(&temp, path).map_err(|e| {
        let _ = fs::remove_file(&temp);
        file_error(path, format!("cannot replace: {e}"))
    })?;
    sync_dir(dir);
    Ok(())
}

/// Writes `path` only if it does not exist; false if it did.
fn write_new(dir: &Path, path: &Path, text: &str) -> Result<bool, PeerError> {
    let temp = write_temp(dir, path, text)?;
    let linked = fs::hard_link(&temp, path);
    let _ = fs::remove_file(&temp);
    match linked {
        Ok(()) => {
            sync_dir(dir);
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(file_error(path, format!("cannot write: {e}"))),
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let mut r = [0u8; 6];
        getrandom::fill(&mut r).expect("randomness");
        let dir = std::env::temp_dir().join(format!("punchline-contacts-{tag}-{}", hex(&r)));
        dir
    }

    fn offer(k: u8, p: u8) -> Offer {
        Offer {
            key: [k; 32],
            pairing: [p; 32],
        }
    }

    #[test]
    fn an_identity_is_made_once_and_kept() {
        let dir = temp_dir("identity");
        let (first, made) = Identity::load_or_create(&dir).expect("made");
        assert!(made);
        let (again, made) = Identity::load_or_create(&dir).expect("loaded");
        assert!(!made);
        assert_eq!(first.public(), again.public());
        assert_eq!(first.secret(), again.secret());
        let mode = fs::metadata(dir.join(IDENTITY_FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the identity is the user's only");
        let dir_mode = fs::metadata(&dir).expect("dir").permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_public_key_is_the_x25519_base_point_times_the_secret() {
        // RFC 7748, section 6.1: Alice's keys.
        let secret = unhex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
            .expect("hex");
        let public = unhex32("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
            .expect("hex");
        assert_eq!(Identity::from_secret(secret).public(), public);
    }

    #[test]
    fn a_corrupt_identity_is_an_error_naming_it_and_is_kept() {
        let dir = temp_dir("corrupt-identity");
        make_dir(&dir).expect("dir");
        let path = dir.join(IDENTITY_FILE);
        for text in [
            "garbage {{",
            "version = 1\nsecret = \"abcd\"\n",
            "version = 7\nsecret = \"00\"\n",
        ] {
            fs::write(&path, text).expect("write");
            let e = Identity::load_or_create(&dir)
                .expect_err("refused")
                .to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains("never replaces"), "{e}");
            assert_eq!(fs::read_to_string(&path).expect("kept"), text);
        }
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn contacts_are_saved_renamed_and_forgotten() {
        let dir = temp_dir("book");
        let now = SystemTime::now();
        let saved = Book::update(&dir, |b| b.save("alice", &offer(1, 2), now)).expect("saved");
        assert_eq!(saved, Saved::New);
        let book = Book::load(&dir).expect("loads");
        let alice = book.get("alice").expect("there");
        assert_eq!((alice.key, alice.pairing), ([1; 32], [2; 32]));
        let mode = fs::metadata(dir.join(CONTACTS_FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // The same key again (another chat's pairing): refused, the old
        // pairing kept (the other side holds it too).
        let e = Book::update(&dir, |b| b.save("alice", &offer(1, 3), now))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("already your contact"), "{e}");
        assert_eq!(
            Book::load(&dir)
                .expect("loads")
                .get("alice")
                .expect("there")
                .pairing,
            [2; 32]
        );
        // Another key under the name: refused, loudly, with what to do.
        let e = Book::update(&dir, |b| b.save("alice", &offer(9, 9), now))
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("another key") && e.contains("peer contacts forget alice"),
            "{e}"
        );
        // The same key under another name: refused.
        let e = Book::update(&dir, |b| b.save("al", &offer(1, 2), now))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("already saved as \"alice\""), "{e}");

        Book::update(&dir, |b| b.rename("alice", "ally")).expect("renamed");
        let book = Book::load(&dir).expect("loads");
        assert!(book.get("alice").is_none() && book.get("ally").is_some());
        let gone = Book::update(&dir, |b| b.forget("ally")).expect("forgotten");
        assert_eq!(gone.key, [1; 32]);
        assert!(Book::load(&dir).expect("loads").contacts.is_empty());
        let e = Book::update(&dir, |b| b.forget("ally"))
            .expect_err("none")
            .to_string();
        assert!(e.contains("no contact named"), "{e}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_corrupt_contacts_file_is_an_error_naming_it_and_is_kept() {
        let dir = temp_dir("corrupt-book");
        make_dir(&dir).expect("dir");
        let path = dir.join(CONTACTS_FILE);
        let key = "ab".repeat(32);
        for text in [
            "[[contact]\n".to_owned(),
            "version = 2\n".to_owned(),
            format!("version = 1\n[[contact]]\nname = \"a\"\nkey = \"zz\"\npairing = \"{key}\"\nsaved = 1\n"),
            format!("version = 1\n[[contact]]\nname = \"-x\"\nkey = \"{key}\"\npairing = \"{key}\"\nsaved = 1\n"),
            format!("version = 1\n[[contact]]\nname = \"a\"\nkey = \"{key}\"\npairing = \"{key}\"\nsaved = 1\n[[contact]]\nname = \"a\"\nkey = \"{key}\"\npairing = \"{key}\"\nsaved = 1\n"),
        ] {
            fs::write(&path, &text).expect("write");
            let e = Book::load(&dir).expect_err("refused").to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
            let e = Book::update(&dir, |b| b.save("z", &offer(5, 5), SystemTime::now()))
                .expect_err("not replaced")
                .to_string();
            assert!(e.contains("never replaces"), "{e}");
            assert_eq!(fs::read_to_string(&path).expect("kept"), text);
        }
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn contact_names() {
        for good in ["alice", "Bob_2", "é.t-é", "a"] {
            assert!(validate_contact_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "@a", &"x".repeat(33)] {
            assert!(validate_contact_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rooms_change_every_epoch() {
        let t = UNIX_EPOCH + Duration::from_secs(3600 * 100 + 59 * 60);
        assert_eq!(room_epoch(t), 100);
        assert_eq!(until_next_epoch(t), Duration::from_secs(60));
        assert_eq!(room_epoch(t + Duration::from_secs(60)), 101);
    }
}

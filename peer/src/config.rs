//! The user's settings file, `config.toml` in the config directory
//! ([`crate::contacts::config_dir`]): the default rendezvous and name, so that
//! neither needs typing every time. Flags and `PUNCHLINE_SERVER` come first.
//!
//! ```toml
//! server = "rv.example.org"   # HOST[:PORT]
//! name = "alice"
//! ```
//!
//! A file that cannot be read, or holds something else, is an error naming
//! it (a misspelt key would otherwise be ignored without a word).

use std::path::Path;

use serde::Deserialize;

use crate::contacts::config_dir;
use crate::error::PeerError;

/// The settings file's name, in the config directory.
pub const CONFIG_FILE: &str = "config.toml";

/// What the settings file sets.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The rendezvous, `HOST[:PORT]`.
    pub server: Option<String>,
    /// The name shown to the other side.
    pub name: Option<String>,
}

impl FileConfig {
    /// The settings in the config directory (none if there is no file).
    pub fn load() -> Result<FileConfig, PeerError> {
        let dir = match config_dir() {
            Ok(dir) => dir,
            // No HOME and no XDG_CONFIG_HOME: no file to read either.
            Err(_) => return Ok(FileConfig::default()),
        };
        FileConfig::load_from(&dir.join(CONFIG_FILE))
    }

    /// The settings in `path` (none if it does not exist).
    pub fn load_from(path: &Path) -> Result<FileConfig, PeerError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileConfig::default()),
            Err(e) => return Err(bad(path, format!("cannot read: {e}"))),
        };
        let config: FileConfig = toml::from_str(&text).map_err(|e| {
            bad(
                path,
                format!(
                    "not understood: {} (it may set `server` and `name`)",
                    e.message().trim().replace('\n', " ")
                ),
            )
        })?;
        if let Some(name) = &config.name {
            punchline_proto::validate_name(name).map_err(|e| bad(path, format!("name: {e}")))?;
        }
        if config
            .server
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            return Err(bad(path, "server is empty".into()));
        }
        Ok(config)
    }
}

fn bad(path: &Path, why: String) -> PeerError {
    PeerError::Usage(format!("{}: {why}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_read_and_mistakes_named() {
        let dir = std::env::temp_dir().join(format!("punchline-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join(CONFIG_FILE);
        assert_eq!(
            FileConfig::load_from(&path).expect("no file"),
            FileConfig::default()
        );
        std::fs::write(&path, "server = \"rv.example.org:99\"\nname = \"ada\"\n").expect("write");
        let config = FileConfig::load_from(&path).expect("read");
        assert_eq!(config.server.as_deref(), Some("rv.example.org:99"));
        assert_eq!(config.name.as_deref(), Some("ada"));
        for bad in [
            "sever = \"x\"\n",
            "server = 5\n",
            "name = \"\"\n",
            "server = \" \"\n",
        ] {
            std::fs::write(&path, bad).expect("write");
            let e = FileConfig::load_from(&path).expect_err(bad).to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}

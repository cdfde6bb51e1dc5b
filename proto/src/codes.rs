//! Codes: `NAMEPLATE-WORD-WORD…`, like `7-guitar-orbit`.
//!
//! The nameplate (a number) is all the rendezvous learns: it is the room both
//! peers meet in. The words are a password that never leaves the peers: both run
//! SPAKE2 with the whole code, so someone who knows only the nameplate (the
//! rendezvous operator included) gets one online guess per code. Each word comes
//! from [`WORDS`], 256 words, so each carries 8 bits; two words (the default)
//! give 16 bits, a 1 in 65,536 chance per guess.
//!
//! The word list was made for this project: common, concrete, easy to spell and
//! say, 3 to 7 letters, and no two words share their first three letters (so a
//! word can later be completed from its start).

/// The word list codes are made of, 256 words (8 bits each).
pub const WORDS: [&str; 256] = [
    "acid", "acorn", "actor", "adobe", "agent", "alarm", "album", "alley", "amber", "anchor",
    "angle", "ankle", "apple", "apron", "arena", "arrow", "aspen", "atlas", "attic", "autumn",
    "bacon", "badge", "bagel", "bakery", "bamboo", "banjo", "barrel", "basil", "beach", "bell",
    "bench", "berry", "bison", "board", "bottle", "bounce", "bread", "brick", "broom", "bubble",
    "bucket", "bugle", "button", "cabin", "cactus", "camel", "canal", "carpet", "castle", "cedar",
    "cello", "cereal", "chalk", "cherry", "cider", "circus", "clover", "cobalt", "comet", "copper",
    "coral", "cotton", "cowboy", "crayon", "curtain", "cushion", "daisy", "dancer", "delta",
    "denim", "desert", "diamond", "dolphin", "domino", "donkey", "dragon", "drum", "eagle",
    "easel", "eclipse", "elbow", "ember", "engine", "falcon", "feather", "fence", "ferry",
    "fiddle", "fig", "flute", "forest", "fossil", "fox", "galaxy", "garden", "gazelle", "gecko",
    "geyser", "ginger", "glacier", "globe", "goblet", "granite", "guitar", "hammock", "harbor",
    "hazel", "helmet", "heron", "hickory", "honey", "hornet", "husky", "igloo", "island", "ivory",
    "jacket", "jaguar", "jasmine", "jelly", "jigsaw", "jungle", "kayak", "kernel", "kettle",
    "kitten", "koala", "ladder", "lagoon", "lantern", "laptop", "lemon", "lentil", "lettuce",
    "lily", "lizard", "lobster", "locket", "lotus", "lumber", "magnet", "mango", "maple", "marble",
    "meadow", "melon", "meteor", "mint", "mirror", "mitten", "monkey", "mosaic", "muffin",
    "mustard", "napkin", "nectar", "needle", "nickel", "noodle", "nutmeg", "oasis", "ocean",
    "octopus", "olive", "onion", "orbit", "orchid", "otter", "oyster", "paddle", "palace", "panda",
    "papaya", "parrot", "peanut", "pebble", "pepper", "piano", "pickle", "pigeon", "pillow",
    "pirate", "planet", "plum", "pocket", "pony", "poppy", "potato", "prism", "pumpkin", "puzzle",
    "quartz", "quill", "rabbit", "raccoon", "radar", "raft", "rainbow", "raven", "ribbon", "river",
    "robin", "rocket", "saddle", "salmon", "sandal", "saturn", "scarf", "scooter", "seagull",
    "shadow", "shovel", "silver", "skate", "sled", "slipper", "snail", "sparrow", "spider",
    "sponge", "spruce", "stable", "storm", "sugar", "summit", "sunset", "swan", "tablet", "tango",
    "teapot", "thistle", "thunder", "tiger", "timber", "toast", "tomato", "topaz", "tractor",
    "trumpet", "tulip", "tundra", "turtle", "valley", "velvet", "violin", "volcano", "waffle",
    "walnut", "wagon", "whale", "willow", "window", "wizard", "yogurt", "zebra", "zipper",
];

/// Fewest words a code must have.
pub const MIN_WORDS: usize = 1;

/// Most words a code may have.
pub const MAX_WORDS: usize = 8;

/// Words in a generated code by default (16 bits).
pub const DEFAULT_WORDS: usize = 2;

/// A code split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    /// The nameplate: the rendezvous room, a decimal number.
    pub nameplate: String,
    /// The password words.
    pub words: Vec<String>,
}

/// Why a typed code is not a code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadCode {
    /// Not `NAMEPLATE-WORD…`.
    #[error("a code looks like 7-guitar-orbit: a number, then {MIN_WORDS} to {MAX_WORDS} words, joined by '-'")]
    Shape,
}

impl Code {
    /// Parses a typed code: trimmed, lower-cased, `NAMEPLATE-WORD[-WORD…]` with a
    /// decimal nameplate and words of letters and digits. Words need not be from
    /// [`WORDS`]: two users may agree on any code.
    pub fn parse(typed: &str) -> Result<Code, BadCode> {
        let typed = typed.trim().to_ascii_lowercase();
        let mut parts = typed.split('-');
        let nameplate = parts.next().unwrap_or_default().to_owned();
        let words: Vec<String> = parts.map(str::to_owned).collect();
        let nameplate_ok = !nameplate.is_empty()
            && nameplate.len() <= MAX_NAMEPLATE_DIGITS
            && nameplate.bytes().all(|b| b.is_ascii_digit());
        let words_ok = (MIN_WORDS..=MAX_WORDS).contains(&words.len())
            && words.iter().all(|w| {
                !w.is_empty()
                    && w.len() <= MAX_WORD_LEN
                    && w.bytes().all(|b| b.is_ascii_alphanumeric())
            });
        if nameplate_ok && words_ok {
            Ok(Code { nameplate, words })
        } else {
            Err(BadCode::Shape)
        }
    }

    /// A new code in `nameplate` with `n` words drawn from [`WORDS`] with the
    /// bytes of `random` (one byte a word; at least `n` bytes).
    pub fn generate(nameplate: &str, random: &[u8], n: usize) -> Code {
        Code {
            nameplate: nameplate.to_owned(),
            words: random
                .iter()
                .take(n)
                .map(|&b| WORDS[usize::from(b)].to_owned())
                .collect(),
        }
    }

    /// Bits of guessing entropy, if every word is from [`WORDS`] and was drawn
    /// at random.
    pub fn bits(&self) -> usize {
        8 * self.words.len()
    }

    /// The password both peers feed SPAKE2: the whole code, so the key is bound
    /// to the nameplate too.
    pub fn password(&self) -> String {
        self.to_string()
    }
}

/// Longest nameplate, in digits.
pub const MAX_NAMEPLATE_DIGITS: usize = 9;

/// Longest word of a typed code.
pub const MAX_WORD_LEN: usize = 16;

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.nameplate)?;
        for w in &self.words {
            write!(f, "-{w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_list_is_usable() {
        let mut prefixes: Vec<&str> = WORDS.iter().map(|w| &w[..3]).collect();
        prefixes.sort();
        prefixes.dedup();
        assert_eq!(prefixes.len(), 256, "first three letters must differ");
        assert!(WORDS
            .iter()
            .all(|w| (3..=7).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase())));
    }

    #[test]
    fn codes_parse_and_print() {
        let c = Code::parse(" 7-Guitar-orbit ").expect("valid");
        assert_eq!(c.nameplate, "7");
        assert_eq!(c.words, ["guitar", "orbit"]);
        assert_eq!(c.to_string(), "7-guitar-orbit");
        for bad in [
            "",
            "7",
            "7-",
            "guitar-orbit",
            "7-a b",
            "x7-guitar",
            "7--orbit",
            "1234567890-a",
        ] {
            assert_eq!(Code::parse(bad), Err(BadCode::Shape), "{bad:?}");
        }
    }

    #[test]
    fn generated_codes_use_the_list() {
        let c = Code::generate("12", &[0, 255, 9], 2);
        assert_eq!(c.to_string(), format!("12-{}-{}", WORDS[0], WORDS[255]));
        assert_eq!(c.bits(), 16);
        assert_eq!(Code::parse(&c.to_string()), Ok(c));
    }
}

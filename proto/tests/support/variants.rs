//! The variants of a message enum, as its `serde` derive declares them, and the
//! variant a message encodes as. Shared by the golden-byte tests
//! (`tests/wire_format.rs`) and the codec's property tests (`src/codec.rs`), so
//! both can check they cover every variant without a hand-kept list that could
//! fall behind the enum.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Serialize;

/// The names of `T`'s variants in declaration order, which is the order of
/// their indices on the wire. Read from `T`'s derived `Deserialize`, which hands
/// the full list to `deserialize_enum`; panics if `T` is not an enum.
pub fn variant_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    // The capture always ends the deserialisation with an error: only the list
    // it saw on the way matters.
    let _ = T::deserialize(CaptureVariants(&mut names));
    assert!(
        !names.is_empty(),
        "{} is not an enum",
        std::any::type_name::<T>()
    );
    names
}

/// The name of the variant `msg` encodes as: the variant index at the start of
/// its encoding (a varint), looked up in [`variant_names`]. Encoded with the
/// protocol's bincode configuration (its size limit aside), not through the
/// crate, so that the crate's own tests can use this too.
pub fn variant_name<T: Serialize + DeserializeOwned>(msg: &T) -> &'static str {
    let payload = bincode::serde::encode_to_vec(msg, bincode::config::standard()).expect("encodes");
    let (index, _): (u32, usize) =
        bincode::decode_from_slice(&payload, bincode::config::standard())
            .expect("an enum encoding starts with its variant index");
    let names = variant_names::<T>();
    usize::try_from(index)
        .ok()
        .and_then(|i| names.get(i))
        .unwrap_or_else(|| panic!("variant index {index} of {names:?}"))
}

/// A deserializer that records the variant list of the enum asked of it, then
/// gives up.
struct CaptureVariants<'a>(&'a mut &'static [&'static str]);

/// The error [`CaptureVariants`] stops with.
#[derive(Debug)]
struct Captured;

impl fmt::Display for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("variant names captured")
    }
}

impl std::error::Error for Captured {}

impl de::Error for Captured {
    fn custom<M: fmt::Display>(_: M) -> Self {
        Captured
    }
}

impl<'de> Deserializer<'de> for CaptureVariants<'_> {
    type Error = Captured;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Captured> {
        Err(Captured)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Captured> {
        *self.0 = variants;
        Err(Captured)
    }

    // As bincode: types with two forms (`SocketAddr`) take the compact one,
    // which is the one on the wire.
    fn is_human_readable(&self) -> bool {
        false
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
        struct identifier ignored_any
    }
}

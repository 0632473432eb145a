//! `luaproxy.json`'s settings, cjson's `encode_*`/`decode_*` functions: their values, defaults and
//! argument rules, without Lua (lua.rs reads the arguments and pushes the results).
//!
//! A module instance keeps its `Settings` in a userdata that is an upvalue of each of its
//! functions, so `encode`/`decode` read them with one pointer copy per call, and two instances
//! (two workers' VMs, or `json.new()`) never share them.

/// `encode_invalid_numbers`: what NaN and ±inf encode as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvalidNumbers {
    /// Refused: `nil, err`.
    Off,
    /// `NaN`, `Infinity`, `-Infinity` (JavaScript's spelling, as OpenResty's cjson writes them).
    On,
    /// `null`.
    Null,
}

/// `encode_number_precision`'s value for "the shortest text that reads back to the same float",
/// luaproxy's default; 1 to 16 print `%.<n>g` as cjson does.
pub const SHORTEST: u8 = 17;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub sparse_convert: bool,
    pub sparse_ratio: u32,
    pub sparse_safe: u32,
    pub encode_max_depth: u32,
    pub decode_max_depth: u32,
    pub precision: u8,
    pub escape_slash: bool,
    pub encode_invalid: InvalidNumbers,
    pub decode_invalid: bool,
    pub empty_table_as_object: bool,
    pub decode_array_mt: bool,
    pub keep_buffer: bool,
}

/// cjson 2.1's defaults, except where luaproxy documented its own before these settings existed:
/// the shortest round-trip floats, strict numbers on decode, and decoded arrays carrying
/// `array_mt`.
pub const DEFAULT: Settings = Settings {
    sparse_convert: false,
    sparse_ratio: 2,
    sparse_safe: 10,
    encode_max_depth: 1000,
    decode_max_depth: 1000,
    precision: SHORTEST,
    escape_slash: true,
    encode_invalid: InvalidNumbers::Off,
    decode_invalid: false,
    empty_table_as_object: true,
    decode_array_mt: true,
    keep_buffer: true,
};

const INT_MAX: i64 = i32::MAX as i64;
const ON_OFF: &[&str] = &["off", "on"];
const ON_OFF_NULL: &[&str] = &["off", "on", "null"];

/// What one argument position of a setter takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A boolean (`true` is option 1) or one of these option names (luaL_checkoption).
    Switch(&'static [&'static str]),
    /// An integer in `min..=max` (luaL_checkinteger, then cjson's range check).
    Integer(i64, i64),
}

/// One setting, as a setter reads and writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    SparseConvert,
    SparseRatio,
    SparseSafe,
    EncodeMaxDepth,
    DecodeMaxDepth,
    Precision,
    EscapeSlash,
    EncodeInvalid,
    DecodeInvalid,
    EmptyTableAsObject,
    DecodeArrayMt,
    KeepBuffer,
}

impl Field {
    fn kind(self) -> Kind {
        match self {
            Field::SparseRatio | Field::SparseSafe => Kind::Integer(0, INT_MAX),
            Field::EncodeMaxDepth | Field::DecodeMaxDepth => Kind::Integer(1, INT_MAX),
            Field::Precision => Kind::Integer(1, SHORTEST as i64),
            Field::EncodeInvalid => Kind::Switch(ON_OFF_NULL),
            _ => Kind::Switch(ON_OFF),
        }
    }
}

/// The setter functions, in the order lua.rs registers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setter {
    EncodeSparseArray,
    EncodeMaxDepth,
    DecodeMaxDepth,
    EncodeNumberPrecision,
    EncodeEscapeForwardSlash,
    EncodeInvalidNumbers,
    DecodeInvalidNumbers,
    EncodeEmptyTableAsObject,
    DecodeArrayWithArrayMt,
    EncodeKeepBuffer,
}

pub const SETTERS: [Setter; 10] = [
    Setter::EncodeSparseArray,
    Setter::EncodeMaxDepth,
    Setter::DecodeMaxDepth,
    Setter::EncodeNumberPrecision,
    Setter::EncodeEscapeForwardSlash,
    Setter::EncodeInvalidNumbers,
    Setter::DecodeInvalidNumbers,
    Setter::EncodeEmptyTableAsObject,
    Setter::DecodeArrayWithArrayMt,
    Setter::EncodeKeepBuffer,
];

impl Setter {
    pub fn name(self) -> &'static str {
        match self {
            Setter::EncodeSparseArray => "encode_sparse_array",
            Setter::EncodeMaxDepth => "encode_max_depth",
            Setter::DecodeMaxDepth => "decode_max_depth",
            Setter::EncodeNumberPrecision => "encode_number_precision",
            Setter::EncodeEscapeForwardSlash => "encode_escape_forward_slash",
            Setter::EncodeInvalidNumbers => "encode_invalid_numbers",
            Setter::DecodeInvalidNumbers => "decode_invalid_numbers",
            Setter::EncodeEmptyTableAsObject => "encode_empty_table_as_object",
            Setter::DecodeArrayWithArrayMt => "decode_array_with_array_mt",
            Setter::EncodeKeepBuffer => "encode_keep_buffer",
        }
    }

    fn fields(self) -> &'static [Field] {
        match self {
            Setter::EncodeSparseArray => {
                &[Field::SparseConvert, Field::SparseRatio, Field::SparseSafe]
            }
            Setter::EncodeMaxDepth => &[Field::EncodeMaxDepth],
            Setter::DecodeMaxDepth => &[Field::DecodeMaxDepth],
            Setter::EncodeNumberPrecision => &[Field::Precision],
            Setter::EncodeEscapeForwardSlash => &[Field::EscapeSlash],
            Setter::EncodeInvalidNumbers => &[Field::EncodeInvalid],
            Setter::DecodeInvalidNumbers => &[Field::DecodeInvalid],
            Setter::EncodeEmptyTableAsObject => &[Field::EmptyTableAsObject],
            Setter::DecodeArrayWithArrayMt => &[Field::DecodeArrayMt],
            Setter::EncodeKeepBuffer => &[Field::KeepBuffer],
        }
    }

    /// What each argument position takes; more arguments than this are refused.
    pub fn kind(self, arg: usize) -> Option<Kind> {
        self.fields().get(arg).map(|f| f.kind())
    }

    pub fn arity(self) -> usize {
        self.fields().len()
    }
}

/// An argument as lua.rs read it for its position's `Kind` (type errors are raised there).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg<'a> {
    /// Absent or nil: the setting is only read.
    Nil,
    Bool(bool),
    Int(i64),
    /// A string, or a number given where an option name goes (cjson compares its text).
    Str(&'a [u8]),
}

/// A setting's value as a setter returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Out {
    Bool(bool),
    Int(i64),
    Str(&'static str),
}

impl Settings {
    fn get(&self, f: Field) -> i64 {
        match f {
            Field::SparseConvert => self.sparse_convert as i64,
            Field::SparseRatio => self.sparse_ratio as i64,
            Field::SparseSafe => self.sparse_safe as i64,
            Field::EncodeMaxDepth => self.encode_max_depth as i64,
            Field::DecodeMaxDepth => self.decode_max_depth as i64,
            Field::Precision => self.precision as i64,
            Field::EscapeSlash => self.escape_slash as i64,
            Field::EncodeInvalid => match self.encode_invalid {
                InvalidNumbers::Off => 0,
                InvalidNumbers::On => 1,
                InvalidNumbers::Null => 2,
            },
            Field::DecodeInvalid => self.decode_invalid as i64,
            Field::EmptyTableAsObject => self.empty_table_as_object as i64,
            Field::DecodeArrayMt => self.decode_array_mt as i64,
            Field::KeepBuffer => self.keep_buffer as i64,
        }
    }

    /// `v` was checked against the field's `Kind`.
    fn put(&mut self, f: Field, v: i64) {
        match f {
            Field::SparseConvert => self.sparse_convert = v != 0,
            Field::SparseRatio => self.sparse_ratio = v as u32,
            Field::SparseSafe => self.sparse_safe = v as u32,
            Field::EncodeMaxDepth => self.encode_max_depth = v as u32,
            Field::DecodeMaxDepth => self.decode_max_depth = v as u32,
            Field::Precision => self.precision = v as u8,
            Field::EscapeSlash => self.escape_slash = v != 0,
            Field::EncodeInvalid => {
                self.encode_invalid = match v {
                    0 => InvalidNumbers::Off,
                    1 => InvalidNumbers::On,
                    _ => InvalidNumbers::Null,
                }
            }
            Field::DecodeInvalid => self.decode_invalid = v != 0,
            Field::EmptyTableAsObject => self.empty_table_as_object = v != 0,
            Field::DecodeArrayMt => self.decode_array_mt = v != 0,
            Field::KeepBuffer => self.keep_buffer = v != 0,
        }
    }

    /// Runs a setter: checks every argument first (so a bad one changes nothing), stores the
    /// non-nil ones, and returns the setter's values after. `Err((argument number, message))`
    /// carries cjson's message for a bad value.
    pub fn apply(&mut self, s: Setter, args: &[Arg]) -> Result<Vec<Out>, (usize, String)> {
        let fields = s.fields();
        let mut new = [None; 3];
        for (i, (&f, arg)) in fields.iter().zip(args).enumerate() {
            new[i] = match (f.kind(), *arg) {
                (_, Arg::Nil) => None,
                (Kind::Switch(_), Arg::Bool(b)) => Some(b as i64),
                (Kind::Switch(options), Arg::Str(name)) => {
                    match options.iter().position(|o| o.as_bytes() == name) {
                        Some(v) => Some(v as i64),
                        None => {
                            let name = String::from_utf8_lossy(name);
                            return Err((i + 1, format!("invalid option '{name}'")));
                        }
                    }
                }
                (Kind::Integer(min, max), Arg::Int(v)) if (min..=max).contains(&v) => Some(v),
                (Kind::Integer(min, max), Arg::Int(_)) => {
                    return Err((i + 1, format!("expected integer between {min} and {max}")))
                }
                (Kind::Switch(_), Arg::Int(_)) | (Kind::Integer(..), _) => {
                    return Err((i + 1, "bad argument type".into()))
                }
            };
        }
        for (&f, v) in fields.iter().zip(new) {
            if let Some(v) = v {
                self.put(f, v);
            }
        }
        Ok(fields
            .iter()
            .map(|&f| {
                let v = self.get(f);
                match f.kind() {
                    Kind::Integer(..) => Out::Int(v),
                    Kind::Switch(_) if v <= 1 => Out::Bool(v == 1),
                    Kind::Switch(options) => Out::Str(options[v as usize]),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_returns_the_defaults() {
        let mut s = DEFAULT;
        let out = s.apply(Setter::EncodeSparseArray, &[Arg::Nil, Arg::Nil, Arg::Nil]);
        assert_eq!(out, Ok(vec![Out::Bool(false), Out::Int(2), Out::Int(10)]));
        assert_eq!(
            s.apply(Setter::EncodeMaxDepth, &[]),
            Ok(vec![Out::Int(1000)])
        );
        assert_eq!(
            s.apply(Setter::EncodeNumberPrecision, &[]),
            Ok(vec![Out::Int(17)])
        );
        assert_eq!(
            s.apply(Setter::EncodeInvalidNumbers, &[]),
            Ok(vec![Out::Bool(false)])
        );
        assert_eq!(s, DEFAULT);
    }

    #[test]
    fn switches_take_booleans_and_option_names() {
        let mut s = DEFAULT;
        assert_eq!(
            s.apply(Setter::EncodeSparseArray, &[Arg::Str(b"on")])
                .unwrap()[0],
            Out::Bool(true)
        );
        assert!(s.sparse_convert);
        s.apply(Setter::EncodeSparseArray, &[Arg::Bool(false)])
            .unwrap();
        assert!(!s.sparse_convert);
        let out = s
            .apply(Setter::EncodeInvalidNumbers, &[Arg::Str(b"null")])
            .unwrap();
        assert_eq!(out, vec![Out::Str("null")]);
        assert_eq!(s.encode_invalid, InvalidNumbers::Null);
        let out = s
            .apply(Setter::EncodeInvalidNumbers, &[Arg::Bool(true)])
            .unwrap();
        assert_eq!(out, vec![Out::Bool(true)]);
        assert_eq!(s.encode_invalid, InvalidNumbers::On);
        let err = s.apply(Setter::EncodeEscapeForwardSlash, &[Arg::Str(b"yes")]);
        assert_eq!(err, Err((1, "invalid option 'yes'".into())));
        // "null" is an option of encode_invalid_numbers only
        assert!(s
            .apply(Setter::DecodeInvalidNumbers, &[Arg::Str(b"null")])
            .is_err());
    }

    #[test]
    fn integers_are_range_checked_and_a_bad_argument_changes_nothing() {
        let mut s = DEFAULT;
        let err = s.apply(
            Setter::EncodeSparseArray,
            &[Arg::Bool(true), Arg::Int(3), Arg::Int(-1)],
        );
        assert_eq!(
            err,
            Err((3, "expected integer between 0 and 2147483647".into()))
        );
        assert_eq!(s, DEFAULT);
        let out = s
            .apply(Setter::EncodeSparseArray, &[Arg::Nil, Arg::Int(3)])
            .unwrap();
        assert_eq!(out, vec![Out::Bool(false), Out::Int(3), Out::Int(10)]);
        assert!(s.apply(Setter::EncodeMaxDepth, &[Arg::Int(0)]).is_err());
        assert!(s
            .apply(Setter::EncodeNumberPrecision, &[Arg::Int(18)])
            .is_err());
        assert_eq!(
            s.apply(Setter::EncodeNumberPrecision, &[Arg::Int(16)]),
            Ok(vec![Out::Int(16)])
        );
        assert_eq!(s.precision, 16);
        assert!(s
            .apply(Setter::DecodeMaxDepth, &[Arg::Int(i64::MAX)])
            .is_err());
    }

    #[test]
    fn every_setter_has_a_name_and_arguments() {
        for s in SETTERS {
            assert!(!s.name().is_empty());
            assert!(s.arity() >= 1 && s.kind(s.arity()).is_none());
        }
    }
}

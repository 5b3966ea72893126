//! Element types of safetensors tensors, as far as aoe needs to know them.

use std::fmt;

/// A safetensors dtype. Float types can be interpolated; the rest are passed through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16 (1 sign, 8 exponent, 7 mantissa bits).
    BF16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
    /// FP8 E4M3 "fn" (no infinities, NaN = S.1111.111), max 448.
    F8E4M3,
    /// Any other dtype safetensors knows (integers, bool, F64, F8_E5M2, ...): never interpolated.
    Other(OtherDType),
}

/// Dtypes aoe stores and copies but never interpolates.
#[allow(missing_docs)] // the variants are the safetensors dtype names
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OtherDType {
    Bool,
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F64,
    F8E5M2,
}

impl DType {
    /// Parses the dtype string of a safetensors header; `None` for unknown strings.
    pub fn parse(s: &str) -> Option<DType> {
        use OtherDType::*;
        Some(match s {
            "BF16" => DType::BF16,
            "F16" => DType::F16,
            "F32" => DType::F32,
            "F8_E4M3" => DType::F8E4M3,
            "BOOL" => DType::Other(Bool),
            "U8" => DType::Other(U8),
            "I8" => DType::Other(I8),
            "I16" => DType::Other(I16),
            "U16" => DType::Other(U16),
            "I32" => DType::Other(I32),
            "U32" => DType::Other(U32),
            "I64" => DType::Other(I64),
            "U64" => DType::Other(U64),
            "F64" => DType::Other(F64),
            "F8_E5M2" => DType::Other(F8E5M2),
            _ => return None,
        })
    }

    /// The name safetensors uses in headers.
    pub fn as_str(self) -> &'static str {
        use OtherDType::*;
        match self {
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::F32 => "F32",
            DType::F8E4M3 => "F8_E4M3",
            DType::Other(o) => match o {
                Bool => "BOOL",
                U8 => "U8",
                I8 => "I8",
                I16 => "I16",
                U16 => "U16",
                I32 => "I32",
                U32 => "U32",
                I64 => "I64",
                U64 => "U64",
                F64 => "F64",
                F8E5M2 => "F8_E5M2",
            },
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        use OtherDType::*;
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
            DType::F8E4M3 => 1,
            DType::Other(o) => match o {
                Bool | U8 | I8 | F8E5M2 => 1,
                I16 | U16 => 2,
                I32 | U32 => 4,
                I64 | U64 | F64 => 8,
            },
        }
    }

    /// Whether aoe can interpolate tensors of this dtype.
    pub fn is_mixable(self) -> bool {
        !matches!(self, DType::Other(_))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

//! Modbus register codec: turns the 16-bit registers (and bits) a device returns into typed,
//! scaled values, and engineering values back into registers for writes (FC 5/6/15/16).
//!
//! Multi-register values are described by two independent orders, giving the four common
//! layouts of a 32-bit value whose big-endian bytes are `A B C D`:
//!
//! | word order | byte order | registers (first, second) | name |
//! |------------|------------|---------------------------|------|
//! | big | big | `AB`, `CD` | ABCD (Modbus default) |
//! | little | big | `CD`, `AB` | CDAB (word swap) |
//! | big | little | `BA`, `DC` | BADC (byte swap) |
//! | little | little | `DC`, `BA` | DCBA |
//!
//! 64-bit values follow the same rule over four registers. Registers are taken as the `u16`
//! values a Modbus library hands out (already decoded from the big-endian wire format).

use outpost_runtime::model::Value;

/// The type a point's registers hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    /// One coil or discrete input.
    Bool,
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Two registers, IEEE-754 single precision.
    F32,
    /// Four registers, IEEE-754 double precision.
    F64,
}

impl DataType {
    /// Registers (or bits, for `Bool`) the type occupies.
    pub fn width(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::F64 => 4,
        }
    }

    /// Whether the type is an integer (scaled integers may stay exact).
    pub fn is_integer(self) -> bool {
        matches!(
            self,
            DataType::U16 | DataType::I16 | DataType::U32 | DataType::I32
        )
    }

    /// The name used in configuration files (`type = "f32"`).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::F32 => "f32",
            DataType::F64 => "f64",
        }
    }
}

/// Order of the registers of a multi-register value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WordOrder {
    /// Most significant register first (Modbus convention).
    #[default]
    Big,
    /// Least significant register first ("word swap").
    Little,
}

/// Order of the two bytes inside each register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ByteOrder {
    /// Most significant byte first (Modbus convention).
    #[default]
    Big,
    /// Least significant byte first ("byte swap").
    Little,
}

/// A value as the device holds it, before scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RawValue {
    /// A coil or discrete input.
    Bool(bool),
    /// An unsigned 16-bit register.
    U16(u16),
    /// A signed 16-bit register.
    I16(i16),
    /// An unsigned 32-bit value.
    U32(u32),
    /// A signed 32-bit value.
    I32(i32),
    /// A single-precision float.
    F32(f32),
    /// A double-precision float.
    F64(f64),
}

/// Layout and scaling of one point: everything needed to convert registers both ways.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Format {
    /// Register type.
    pub data_type: DataType,
    /// Register order of multi-register types.
    pub word_order: WordOrder,
    /// Byte order inside each register.
    pub byte_order: ByteOrder,
    /// Engineering value = raw × scale + offset. Non-zero and finite.
    pub scale: f64,
    /// See `scale`. Finite.
    pub offset: f64,
}

impl Format {
    /// An unscaled format with Modbus' default (big/big) orders.
    pub fn new(data_type: DataType) -> Format {
        Format {
            data_type,
            word_order: WordOrder::Big,
            byte_order: ByteOrder::Big,
            scale: 1.0,
            offset: 0.0,
        }
    }

    /// Whether scaling is the identity (integers then stay exact `i64` values).
    pub fn is_unscaled(&self) -> bool {
        self.scale == 1.0 && self.offset == 0.0
    }

    /// Decodes `regs` (exactly `data_type.width()` registers) to the scaled value.
    pub fn decode_registers(&self, regs: &[u16]) -> Result<Value, CodecError> {
        Ok(self.scale_value(decode_raw(
            self.data_type,
            regs,
            self.word_order,
            self.byte_order,
        )?))
    }

    /// Applies scale and offset: unscaled integers stay `I64`, bools stay `Bool`, the rest
    /// becomes `F64`.
    pub fn scale_value(&self, raw: RawValue) -> Value {
        let f = match raw {
            RawValue::Bool(b) => return Value::Bool(b),
            RawValue::U16(v) if self.is_unscaled() => return Value::I64(v.into()),
            RawValue::I16(v) if self.is_unscaled() => return Value::I64(v.into()),
            RawValue::U32(v) if self.is_unscaled() => return Value::I64(v.into()),
            RawValue::I32(v) if self.is_unscaled() => return Value::I64(v.into()),
            RawValue::U16(v) => f64::from(v),
            RawValue::I16(v) => f64::from(v),
            RawValue::U32(v) => f64::from(v),
            RawValue::I32(v) => f64::from(v),
            RawValue::F32(v) => f64::from(v),
            RawValue::F64(v) => v,
        };
        Value::F64(f * self.scale + self.offset)
    }

    /// Inverse of [`Format::scale_value`]: the raw value to write for an engineering value.
    /// Integers are rounded to the nearest and must fit the type.
    pub fn unscale_value(&self, value: &Value) -> Result<RawValue, CodecError> {
        let dt = self.data_type;
        if dt == DataType::Bool {
            return match value {
                Value::Bool(b) => Ok(RawValue::Bool(*b)),
                Value::I64(0) => Ok(RawValue::Bool(false)),
                Value::I64(1) => Ok(RawValue::Bool(true)),
                _ => Err(CodecError::TypeMismatch {
                    data_type: dt.as_str(),
                }),
            };
        }
        // Exact path for unscaled integers.
        if let (Value::I64(v), true) = (value, dt.is_integer() && self.is_unscaled()) {
            let v = *v;
            let out_of_range = || CodecError::OutOfRange {
                value: v as f64,
                data_type: dt.as_str(),
            };
            return match dt {
                DataType::U16 => u16::try_from(v)
                    .map(RawValue::U16)
                    .map_err(|_| out_of_range()),
                DataType::I16 => i16::try_from(v)
                    .map(RawValue::I16)
                    .map_err(|_| out_of_range()),
                DataType::U32 => u32::try_from(v)
                    .map(RawValue::U32)
                    .map_err(|_| out_of_range()),
                _ => i32::try_from(v)
                    .map(RawValue::I32)
                    .map_err(|_| out_of_range()),
            };
        }
        let eng = match value {
            Value::F64(v) => *v,
            Value::I64(v) => *v as f64,
            Value::Bool(b) => f64::from(u8::from(*b)),
            Value::Str(_) => {
                return Err(CodecError::TypeMismatch {
                    data_type: dt.as_str(),
                });
            }
        };
        let raw = (eng - self.offset) / self.scale;
        let out_of_range = || CodecError::OutOfRange {
            value: eng,
            data_type: dt.as_str(),
        };
        if dt == DataType::F64 {
            return if raw.is_nan() == eng.is_nan() && raw.is_finite() == eng.is_finite() {
                Ok(RawValue::F64(raw))
            } else {
                Err(out_of_range())
            };
        }
        if dt == DataType::F32 {
            let r = raw as f32;
            // NaN and ±inf written on purpose are kept; finite values must stay finite.
            return if eng.is_finite() && !r.is_finite() {
                Err(out_of_range())
            } else {
                Ok(RawValue::F32(r))
            };
        }
        let r = raw.round();
        if !r.is_finite() {
            return Err(out_of_range());
        }
        let (lo, hi) = match dt {
            DataType::U16 => (0.0, f64::from(u16::MAX)),
            DataType::I16 => (f64::from(i16::MIN), f64::from(i16::MAX)),
            DataType::U32 => (0.0, f64::from(u32::MAX)),
            _ => (f64::from(i32::MIN), f64::from(i32::MAX)),
        };
        if r < lo || r > hi {
            return Err(out_of_range());
        }
        // In range, so the casts are exact.
        Ok(match dt {
            DataType::U16 => RawValue::U16(r as u16),
            DataType::I16 => RawValue::I16(r as i16),
            DataType::U32 => RawValue::U32(r as u32),
            _ => RawValue::I32(r as i32),
        })
    }

    /// Registers to write (FC 6 for one, FC 16 for several) for an engineering value.
    pub fn encode_registers(&self, value: &Value) -> Result<Vec<u16>, CodecError> {
        let raw = self.unscale_value(value)?;
        encode_raw(raw, self.word_order, self.byte_order)
    }
}

/// Why registers and values do not convert.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The slice does not hold the type's number of registers.
    #[error("{data_type} needs {expected} registers, got {got}")]
    WrongLength {
        /// The type.
        data_type: &'static str,
        /// Registers it needs.
        expected: usize,
        /// Registers given.
        got: usize,
    },
    /// The value does not fit the register type (after unscaling).
    #[error("value {value} does not fit a {data_type} register")]
    OutOfRange {
        /// The engineering value.
        value: f64,
        /// The type.
        data_type: &'static str,
    },
    /// The value's kind cannot be written to this type (a string, or a number to a coil).
    #[error("this value cannot be written as {data_type}")]
    TypeMismatch {
        /// The type.
        data_type: &'static str,
    },
    /// Bools are bits (coils / discrete inputs), not registers.
    #[error("bool points are coils or discrete inputs, not registers")]
    BoolInRegisters,
}

/// Puts the registers into big-endian byte order (`A B C D …`), undoing word and byte order.
fn to_be_bytes(regs: &[u16], word: WordOrder, byte: ByteOrder, out: &mut [u8]) {
    let n = regs.len();
    for (i, r) in regs.iter().enumerate() {
        let slot = match word {
            WordOrder::Big => i,
            WordOrder::Little => n - 1 - i,
        };
        let b = match byte {
            ByteOrder::Big => r.to_be_bytes(),
            ByteOrder::Little => r.to_le_bytes(),
        };
        out[2 * slot..2 * slot + 2].copy_from_slice(&b);
    }
}

/// Inverse of [`to_be_bytes`].
fn from_be_bytes(bytes: &[u8], word: WordOrder, byte: ByteOrder) -> Vec<u16> {
    let mut regs: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| match byte {
            ByteOrder::Big => u16::from_be_bytes([c[0], c[1]]),
            ByteOrder::Little => u16::from_le_bytes([c[0], c[1]]),
        })
        .collect();
    if word == WordOrder::Little {
        regs.reverse();
    }
    regs
}

/// Decodes exactly `data_type.width()` registers into a raw value.
pub fn decode_raw(
    data_type: DataType,
    regs: &[u16],
    word: WordOrder,
    byte: ByteOrder,
) -> Result<RawValue, CodecError> {
    if data_type == DataType::Bool {
        return Err(CodecError::BoolInRegisters);
    }
    let w = usize::from(data_type.width());
    if regs.len() != w {
        return Err(CodecError::WrongLength {
            data_type: data_type.as_str(),
            expected: w,
            got: regs.len(),
        });
    }
    let mut b = [0u8; 8];
    to_be_bytes(regs, word, byte, &mut b[..2 * w]);
    Ok(match data_type {
        DataType::U16 => RawValue::U16(u16::from_be_bytes([b[0], b[1]])),
        DataType::I16 => RawValue::I16(i16::from_be_bytes([b[0], b[1]])),
        DataType::U32 => RawValue::U32(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        DataType::I32 => RawValue::I32(i32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        DataType::F32 => RawValue::F32(f32::from_be_bytes([b[0], b[1], b[2], b[3]])),
        DataType::F64 => RawValue::F64(f64::from_be_bytes(b)),
        DataType::Bool => return Err(CodecError::BoolInRegisters),
    })
}

/// Encodes a raw register value into registers in the given orders.
pub fn encode_raw(raw: RawValue, word: WordOrder, byte: ByteOrder) -> Result<Vec<u16>, CodecError> {
    let bytes: Vec<u8> = match raw {
        RawValue::Bool(_) => return Err(CodecError::BoolInRegisters),
        RawValue::U16(v) => v.to_be_bytes().to_vec(),
        RawValue::I16(v) => v.to_be_bytes().to_vec(),
        RawValue::U32(v) => v.to_be_bytes().to_vec(),
        RawValue::I32(v) => v.to_be_bytes().to_vec(),
        RawValue::F32(v) => v.to_be_bytes().to_vec(),
        RawValue::F64(v) => v.to_be_bytes().to_vec(),
    };
    Ok(from_be_bytes(&bytes, word, byte))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ORDERS: [(WordOrder, ByteOrder, [u16; 2]); 4] = [
        (WordOrder::Big, ByteOrder::Big, [0xAABB, 0xCCDD]),
        (WordOrder::Little, ByteOrder::Big, [0xCCDD, 0xAABB]),
        (WordOrder::Big, ByteOrder::Little, [0xBBAA, 0xDDCC]),
        (WordOrder::Little, ByteOrder::Little, [0xDDCC, 0xBBAA]),
    ];

    #[test]
    fn the_four_32_bit_layouts() {
        for (w, b, regs) in ORDERS {
            assert_eq!(
                decode_raw(DataType::U32, &regs, w, b),
                Ok(RawValue::U32(0xAABB_CCDD)),
                "{w:?}/{b:?}"
            );
            assert_eq!(encode_raw(RawValue::U32(0xAABB_CCDD), w, b).unwrap(), regs);
        }
    }

    #[test]
    fn known_float_and_signed_values() {
        // 123.456f32 = 0x42F6E979; -1.5f64 = 0xBFF8000000000000.
        let f = Format::new(DataType::F32);
        assert_eq!(
            decode_raw(
                DataType::F32,
                &[0x42F6, 0xE979],
                WordOrder::Big,
                ByteOrder::Big
            ),
            Ok(RawValue::F32(123.456))
        );
        assert_eq!(
            decode_raw(
                DataType::F32,
                &[0xE979, 0x42F6],
                WordOrder::Little,
                ByteOrder::Big
            ),
            Ok(RawValue::F32(123.456))
        );
        assert_eq!(
            f.decode_registers(&[0x42F6, 0xE979]).unwrap(),
            Value::F64(f64::from(123.456f32))
        );
        let regs = [0xBFF8, 0, 0, 0];
        assert_eq!(
            decode_raw(DataType::F64, &regs, WordOrder::Big, ByteOrder::Big),
            Ok(RawValue::F64(-1.5))
        );
        assert_eq!(
            decode_raw(
                DataType::F64,
                &[0, 0, 0, 0xF8BF],
                WordOrder::Little,
                ByteOrder::Little
            ),
            Ok(RawValue::F64(-1.5))
        );
        assert_eq!(
            decode_raw(DataType::I16, &[0xFFFE], WordOrder::Big, ByteOrder::Big),
            Ok(RawValue::I16(-2))
        );
        assert_eq!(
            decode_raw(
                DataType::I16,
                &[0xFEFF],
                WordOrder::Little,
                ByteOrder::Little
            ),
            Ok(RawValue::I16(-2))
        );
        assert_eq!(
            decode_raw(
                DataType::I32,
                &[0xFFFF, 0xFFFD],
                WordOrder::Big,
                ByteOrder::Big
            ),
            Ok(RawValue::I32(-3))
        );
        assert_eq!(
            Format::new(DataType::U16)
                .decode_registers(&[65535])
                .unwrap(),
            Value::I64(65535)
        );
    }

    #[test]
    fn wrong_lengths_and_bools_are_errors() {
        assert!(matches!(
            decode_raw(DataType::F64, &[1, 2, 3], WordOrder::Big, ByteOrder::Big),
            Err(CodecError::WrongLength {
                expected: 4,
                got: 3,
                ..
            })
        ));
        assert!(decode_raw(DataType::U16, &[], WordOrder::Big, ByteOrder::Big).is_err());
        assert_eq!(
            decode_raw(DataType::Bool, &[1], WordOrder::Big, ByteOrder::Big),
            Err(CodecError::BoolInRegisters)
        );
    }

    #[test]
    fn scaling_and_its_inverse() {
        let f = Format {
            scale: 0.1,
            offset: -40.0,
            ..Format::new(DataType::I16)
        };
        // raw 653 → 25.3 °C
        let v = f.decode_registers(&[653]).unwrap();
        let Value::F64(x) = v else { panic!("{v:?}") };
        assert!((x - 25.3).abs() < 1e-9);
        assert_eq!(f.encode_registers(&Value::F64(25.3)).unwrap(), vec![653]);
        assert_eq!(
            f.encode_registers(&Value::F64(-43.3)).unwrap(),
            vec![(-33i16) as u16]
        );
        // Out of range after unscaling: (4000 + 40) / 0.1 = 40400 > i16::MAX.
        assert!(matches!(
            f.encode_registers(&Value::F64(4000.0)),
            Err(CodecError::OutOfRange { .. })
        ));
        assert!(f.encode_registers(&Value::F64(f64::NAN)).is_err());
        assert!(f.encode_registers(&Value::text("on")).is_err());
        // Unscaled integers are exact and range-checked.
        let u = Format::new(DataType::U32);
        assert_eq!(
            u.encode_registers(&Value::I64(4_294_967_295)).unwrap(),
            vec![0xFFFF, 0xFFFF]
        );
        assert!(u.encode_registers(&Value::I64(-1)).is_err());
        assert!(u.encode_registers(&Value::I64(1 << 32)).is_err());
        let f32f = Format::new(DataType::F32);
        assert!(f32f.encode_registers(&Value::F64(1e300)).is_err());
        assert_eq!(
            f32f.encode_registers(&Value::F64(1.0)).unwrap(),
            vec![0x3F80, 0]
        );
        let b = Format::new(DataType::Bool);
        assert_eq!(
            b.unscale_value(&Value::Bool(true)),
            Ok(RawValue::Bool(true))
        );
        assert!(b.unscale_value(&Value::F64(0.5)).is_err());
        assert_eq!(
            b.encode_registers(&Value::Bool(true)),
            Err(CodecError::BoolInRegisters)
        );
    }

    fn arb_order() -> impl Strategy<Value = (WordOrder, ByteOrder)> {
        (any::<bool>(), any::<bool>()).prop_map(|(w, b)| {
            (
                if w { WordOrder::Little } else { WordOrder::Big },
                if b { ByteOrder::Little } else { ByteOrder::Big },
            )
        })
    }

    proptest! {
        #[test]
        fn registers_round_trip_in_every_order(
            regs in proptest::collection::vec(any::<u16>(), 4), (w, b) in arb_order()
        ) {
            for dt in [DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::F32, DataType::F64] {
                let n = usize::from(dt.width());
                let raw = decode_raw(dt, &regs[..n], w, b).unwrap();
                prop_assert_eq!(encode_raw(raw, w, b).unwrap(), regs[..n].to_vec());
            }
        }

        #[test]
        fn scaled_integers_round_trip(raw in any::<i16>(), scale in 0.001f64..1000.0, offset in -1e4f64..1e4) {
            let f = Format { scale, offset, ..Format::new(DataType::I16) };
            let v = f.decode_registers(&[raw as u16]).unwrap();
            prop_assert_eq!(f.encode_registers(&v).unwrap(), vec![raw as u16]);
        }
    }
}

//! Modbus pure core: point configuration, the read-request
//! planner that batches a poll group's points into as few requests as the protocol allows,
//! and the mapping of each response back to the points' values. No I/O: the driver actor
//! sends the planned requests with tokio-modbus and hands the answers to
//! [`ReadRequest::decode`].
//!
//! The configuration schema is the gateway's (`outpost_runtime::config::ModbusDeviceConfig`,
//! documented in `config/reference.toml`); the types here are the driver's view of it, built
//! with the `From` conversions below, so there is one schema and one place to document it.
//!
//! [`schedule`] adapts a poll group's plan, poll after poll, to what the device refuses
//! (a batched read answered with "illegal data address").

pub mod client;
pub mod codec;
pub mod schedule;

use std::collections::HashSet;

use outpost_runtime::config::{Endian, ModbusPointConfig, ModbusTable, ModbusType};
use outpost_runtime::model::{MAX_STR_LEN, Value};

pub use codec::{ByteOrder, CodecError, DataType, Format, RawValue, WordOrder};

/// Most registers one read (FC 3/4) may return (Modbus application protocol §6.3).
pub const MAX_READ_REGISTERS: u16 = 125;
/// Most bits one read (FC 1/2) may return (§6.1).
pub const MAX_READ_BITS: u16 = 2000;

/// The four Modbus data tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Read/write bits (FC 1, 5, 15).
    Coils,
    /// Read-only bits (FC 2).
    DiscreteInputs,
    /// Read/write registers (FC 3, 6, 16).
    HoldingRegisters,
    /// Read-only registers (FC 4).
    InputRegisters,
}

impl Table {
    /// Whether the table holds bits rather than registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coils | Table::DiscreteInputs)
    }

    /// The read function code.
    pub fn read_function_code(self) -> u8 {
        match self {
            Table::Coils => 1,
            Table::DiscreteInputs => 2,
            Table::HoldingRegisters => 3,
            Table::InputRegisters => 4,
        }
    }

    /// Whether the master can write to it.
    pub fn is_writable(self) -> bool {
        matches!(self, Table::Coils | Table::HoldingRegisters)
    }

    /// The protocol's limit on one read of this table.
    pub fn max_read(self) -> u16 {
        if self.is_bits() {
            MAX_READ_BITS
        } else {
            MAX_READ_REGISTERS
        }
    }

    /// A short name for logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Coils => "coils",
            Table::DiscreteInputs => "discrete_inputs",
            Table::HoldingRegisters => "holding_registers",
            Table::InputRegisters => "input_registers",
        }
    }
}

impl From<ModbusTable> for Table {
    fn from(t: ModbusTable) -> Table {
        match t {
            ModbusTable::Coil => Table::Coils,
            ModbusTable::DiscreteInput => Table::DiscreteInputs,
            ModbusTable::Holding => Table::HoldingRegisters,
            ModbusTable::Input => Table::InputRegisters,
        }
    }
}

impl From<ModbusType> for DataType {
    fn from(t: ModbusType) -> DataType {
        match t {
            ModbusType::Bool => DataType::Bool,
            ModbusType::U16 => DataType::U16,
            ModbusType::I16 => DataType::I16,
            ModbusType::U32 => DataType::U32,
            ModbusType::I32 => DataType::I32,
            ModbusType::F32 => DataType::F32,
            ModbusType::F64 => DataType::F64,
        }
    }
}

impl From<Endian> for WordOrder {
    fn from(e: Endian) -> WordOrder {
        match e {
            Endian::Big => WordOrder::Big,
            Endian::Little => WordOrder::Little,
        }
    }
}

impl From<Endian> for ByteOrder {
    fn from(e: Endian) -> ByteOrder {
        match e {
            Endian::Big => ByteOrder::Big,
            Endian::Little => ByteOrder::Little,
        }
    }
}

/// One Modbus point as the driver sees it: where it lives and how to read it. Built from a
/// configured `[[devices.modbus.poll_groups.points]]` entry with `From`.
#[derive(Debug, Clone, PartialEq)]
pub struct PointConfig {
    /// Stream name of the point's samples (the config's `stream`).
    pub name: String,
    /// Data table.
    pub table: Table,
    /// Zero-based protocol address of the first register (or bit).
    pub address: u16,
    /// Register type (`bool` for coils and discrete inputs).
    pub data_type: DataType,
    /// Register order of 32/64-bit types.
    pub word_order: WordOrder,
    /// Byte order inside registers.
    pub byte_order: ByteOrder,
    /// Engineering value = raw × scale + offset.
    pub scale: f64,
    /// See `scale`.
    pub offset: f64,
}

impl From<&ModbusPointConfig> for PointConfig {
    /// The schema bounds `address` to 0..=65535; a larger value (a hand-built config) is
    /// clamped to 65535 and then rejected by [`PointConfig::validate`] if the type does not
    /// fit there.
    fn from(c: &ModbusPointConfig) -> PointConfig {
        PointConfig {
            name: c.stream.clone(),
            table: c.table.into(),
            address: u16::try_from(c.address.get()).unwrap_or(u16::MAX),
            data_type: c.data_type.into(),
            word_order: c.word_order.into(),
            byte_order: c.byte_order.into(),
            scale: c.scale,
            offset: c.offset,
        }
    }
}

/// A configuration mistake, naming the point and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("modbus point {point:?}: `{key}` {reason}")]
pub struct ConfigError {
    /// The point's name.
    pub point: String,
    /// The offending key.
    pub key: &'static str,
    /// What is expected.
    pub reason: String,
}

impl PointConfig {
    /// Registers (or bits) the point occupies.
    pub fn count(&self) -> u16 {
        self.data_type.width()
    }

    /// The conversion format of the point.
    pub fn format(&self) -> Format {
        Format {
            data_type: self.data_type,
            word_order: self.word_order,
            byte_order: self.byte_order,
            scale: self.scale,
            offset: self.offset,
        }
    }

    /// One past the last address the point occupies (up to 65 536).
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.count())
    }

    /// Checks the point on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, reason: String| ConfigError {
            point: self.name.clone(),
            key,
            reason,
        };
        if self.name.is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        if self.name.len() > MAX_STR_LEN || self.name.chars().any(char::is_control) {
            return Err(err(
                "name",
                format!("must be at most {MAX_STR_LEN} bytes without control characters"),
            ));
        }
        match (self.table.is_bits(), self.data_type == DataType::Bool) {
            (true, false) => {
                return Err(err(
                    "type",
                    format!(
                        "must be \"bool\" for table {}, not {:?}",
                        self.table.as_str(),
                        self.data_type.as_str()
                    ),
                ));
            }
            (false, true) => {
                return Err(err(
                    "type",
                    format!(
                        "\"bool\" needs table coils or discrete_inputs, not {}",
                        self.table.as_str()
                    ),
                ));
            }
            _ => {}
        }
        if self.end() > 65_536 {
            return Err(err(
                "address",
                format!(
                    "{} + {} registers runs past the last address 65535",
                    self.address,
                    self.count()
                ),
            ));
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            return Err(err("scale", "must be a finite, non-zero number".into()));
        }
        if !self.offset.is_finite() {
            return Err(err("offset", "must be a finite number".into()));
        }
        Ok(())
    }
}

/// Checks every point and that names are unique within the group.
pub fn validate_points(points: &[PointConfig]) -> Result<(), ConfigError> {
    let mut names = HashSet::new();
    for p in points {
        p.validate()?;
        if !names.insert(p.name.as_str()) {
            return Err(ConfigError {
                point: p.name.clone(),
                key: "name",
                reason: "is used by another point of the same device".into(),
            });
        }
    }
    Ok(())
}

/// How the planner may batch: per-request size limits and the unused span it may read to
/// join two points into one request (a gap costs bytes and, on some devices, an "illegal
/// data address" exception if the gap is unmapped, hence 0 by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most registers per read, 1..=125.
    pub max_registers: u16,
    /// Most bits per read, 1..=2000.
    pub max_bits: u16,
    /// Most unused registers read to join two register points.
    pub max_gap_registers: u16,
    /// Most unused bits read to join two bit points.
    pub max_gap_bits: u16,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_registers: MAX_READ_REGISTERS,
            max_bits: MAX_READ_BITS,
            max_gap_registers: 0,
            max_gap_bits: 0,
        }
    }
}

impl BatchConfig {
    /// The batching of a configured device: protocol limits, and the device's `max_gap`
    /// for registers and bits alike.
    pub fn from_max_gap(max_gap: u64) -> BatchConfig {
        let gap = u16::try_from(max_gap).unwrap_or(u16::MAX);
        BatchConfig {
            max_gap_registers: gap,
            max_gap_bits: gap,
            ..BatchConfig::default()
        }
    }

    /// Range-checks the limits against the protocol's.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, reason: &str| ConfigError {
            point: String::new(),
            key,
            reason: reason.into(),
        };
        if !(1..=MAX_READ_REGISTERS).contains(&self.max_registers) {
            return Err(err("max_registers", "must be between 1 and 125"));
        }
        if !(1..=MAX_READ_BITS).contains(&self.max_bits) {
            return Err(err("max_bits", "must be between 1 and 2000"));
        }
        Ok(())
    }

    fn limits(&self, table: Table) -> (u32, u32) {
        let (max, gap) = if table.is_bits() {
            (self.max_bits.min(MAX_READ_BITS), self.max_gap_bits)
        } else {
            (
                self.max_registers.min(MAX_READ_REGISTERS),
                self.max_gap_registers,
            )
        };
        // At least 4 so an f64 always fits one request.
        (u32::from(max.max(4)), u32::from(gap))
    }
}

/// One planned read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// Table to read (gives the function code).
    pub table: Table,
    /// First address.
    pub address: u16,
    /// Registers or bits to read (≥ 1, within the protocol limit, `address + count ≤ 65536`).
    pub count: u16,
    /// Indices (into the planned point slice) of the points this request covers, by address.
    pub points: Vec<usize>,
}

/// A device's answer to a [`ReadRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response<'a> {
    /// FC 3/4 answer.
    Registers(&'a [u16]),
    /// FC 1/2 answer (may be padded up to a multiple of 8).
    Bits(&'a [bool]),
}

/// A response that does not match its request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Registers for a bit read, or the other way round.
    #[error("response kind does not match a read of {0}")]
    Kind(&'static str),
    /// Fewer values than requested (or, for registers, more).
    #[error("response holds {got} values, the request asked for {expected}")]
    Length {
        /// Requested count.
        expected: usize,
        /// Values in the response.
        got: usize,
    },
}

impl ReadRequest {
    /// Maps the device's answer back to `(point index, value)` pairs, one per covered point,
    /// scaled per the point's configuration. `points` is the slice given to [`plan_reads`].
    pub fn decode(
        &self,
        points: &[PointConfig],
        response: Response<'_>,
    ) -> Result<Vec<(usize, Value)>, ResponseError> {
        let count = usize::from(self.count);
        let mut out = Vec::with_capacity(self.points.len());
        match response {
            Response::Registers(regs) => {
                if self.table.is_bits() {
                    return Err(ResponseError::Kind(self.table.as_str()));
                }
                if regs.len() != count {
                    return Err(ResponseError::Length {
                        expected: count,
                        got: regs.len(),
                    });
                }
                for &i in &self.points {
                    let Some(p) = points.get(i) else { continue };
                    let off = usize::from(p.address.wrapping_sub(self.address));
                    let Some(slice) = regs.get(off..off + usize::from(p.count())) else {
                        continue;
                    };
                    // The slice has the type's width, so this only fails for a bool point
                    // in a register table, which validation rules out.
                    if let Ok(v) = p.format().decode_registers(slice) {
                        out.push((i, v));
                    }
                }
            }
            Response::Bits(bits) => {
                if !self.table.is_bits() {
                    return Err(ResponseError::Kind(self.table.as_str()));
                }
                if bits.len() < count {
                    return Err(ResponseError::Length {
                        expected: count,
                        got: bits.len(),
                    });
                }
                for &i in &self.points {
                    let Some(p) = points.get(i) else { continue };
                    let off = usize::from(p.address.wrapping_sub(self.address));
                    if let Some(&b) = bits.get(off) {
                        out.push((i, Value::Bool(b)));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Plans the fewest reads that cover `points` (validated with [`validate_points`]): per
/// table, points sorted by address are joined into one request while the request stays
/// within the size limit and the unused span between a point and the request so far is at
/// most the configured gap. Overlapping points share registers. Greedy joining is optimal
/// here: each request starts at the lowest uncovered point and reaches as far as allowed.
/// Points that fail [`PointConfig::validate`] are left out.
pub fn plan_reads(points: &[PointConfig], batch: &BatchConfig) -> Vec<ReadRequest> {
    plan_reads_with(points, batch, |_| true, |_, _, _| true)
}

/// [`plan_reads`] over the points `include` accepts, joining point `p` to a request only
/// when `may_join(members so far, end of their span, p)` allows it (the read scheduler
/// keeps points the device refuses out, and apart what it refuses to read together).
pub(crate) fn plan_reads_with(
    points: &[PointConfig],
    batch: &BatchConfig,
    include: impl Fn(usize) -> bool,
    may_join: impl Fn(&[usize], u32, usize) -> bool,
) -> Vec<ReadRequest> {
    let mut order: Vec<usize> = (0..points.len())
        .filter(|&i| include(i) && points[i].validate().is_ok())
        .collect();
    order.sort_by_key(|&i| (points[i].table, points[i].address, points[i].count()));
    let mut out: Vec<ReadRequest> = Vec::new();
    // Current request: table, start, end (exclusive, u32 so 65536 is representable).
    let mut cur: Option<(Table, u32, u32, Vec<usize>)> = None;
    for i in order {
        let p = &points[i];
        let (start, end) = (u32::from(p.address), p.end());
        let (max, gap) = batch.limits(p.table);
        if let Some((t, s, e, members)) = &mut cur
            && *t == p.table
            && start <= *e + gap
            && end.max(*e) - *s <= max
            && may_join(members, *e, i)
        {
            *e = (*e).max(end);
            members.push(i);
            continue;
        }
        if let Some(done) = cur.take() {
            out.push(finish(done));
        }
        cur = Some((p.table, start, end, vec![i]));
    }
    if let Some(done) = cur {
        out.push(finish(done));
    }
    out
}

fn finish((table, start, end, points): (Table, u32, u32, Vec<usize>)) -> ReadRequest {
    // start ≤ 65535 and end − start ≤ 2000 by construction.
    ReadRequest {
        table,
        address: start as u16,
        count: (end - start) as u16,
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(name: &str, table: Table, address: u16, data_type: DataType) -> PointConfig {
        PointConfig {
            name: name.into(),
            table,
            address,
            data_type,
            word_order: WordOrder::Big,
            byte_order: ByteOrder::Big,
            scale: 1.0,
            offset: 0.0,
        }
    }

    fn hr(name: &str, address: u16, dt: DataType) -> PointConfig {
        point(name, Table::HoldingRegisters, address, dt)
    }

    fn spans(reqs: &[ReadRequest]) -> Vec<(Table, u16, u16)> {
        reqs.iter().map(|r| (r.table, r.address, r.count)).collect()
    }

    #[test]
    fn points_and_batching_come_from_the_gateway_config_schema() {
        let dev: outpost_runtime::config::ModbusDeviceConfig = toml::from_str(
            r#"
address = "127.0.0.1:502"
max_gap = 3
[[poll_groups]]
interval = "1s"
[[poll_groups.points]]
stream = "boiler/temp"
table = "holding"
address = 100
type = "f32"
word_order = "little"
scale = 0.1
offset = -40
[[poll_groups.points]]
stream = "boiler/on"
table = "discrete_input"
address = 7
type = "bool"
byte_order = "little"
"#,
        )
        .unwrap();
        let pts: Vec<PointConfig> = dev.poll_groups[0]
            .points
            .iter()
            .map(PointConfig::from)
            .collect();
        let p = &pts[0];
        assert_eq!(p.name, "boiler/temp");
        assert_eq!((p.table, p.address), (Table::HoldingRegisters, 100));
        assert_eq!(p.data_type, DataType::F32);
        assert_eq!(
            (p.word_order, p.byte_order),
            (WordOrder::Little, ByteOrder::Big)
        );
        assert_eq!((p.scale, p.offset), (0.1, -40.0));
        assert!(p.validate().is_ok());
        assert_eq!(
            (pts[1].table, pts[1].data_type, pts[1].byte_order),
            (Table::DiscreteInputs, DataType::Bool, ByteOrder::Little)
        );
        assert!(validate_points(&pts).is_ok());
        for (t, want) in [
            (ModbusTable::Coil, Table::Coils),
            (ModbusTable::Input, Table::InputRegisters),
        ] {
            assert_eq!(Table::from(t), want);
        }
        for (t, want) in [
            (ModbusType::U16, DataType::U16),
            (ModbusType::I16, DataType::I16),
            (ModbusType::U32, DataType::U32),
            (ModbusType::I32, DataType::I32),
            (ModbusType::F64, DataType::F64),
        ] {
            assert_eq!(DataType::from(t), want);
        }
        let b = BatchConfig::from_max_gap(dev.max_gap.get());
        assert_eq!(
            b,
            BatchConfig {
                max_gap_registers: 3,
                max_gap_bits: 3,
                ..BatchConfig::default()
            }
        );
        assert!(b.validate().is_ok());
        // An out-of-schema address (hand-built config) is clamped, then fails validation.
        let mut raw = dev.poll_groups[0].points[0].clone();
        raw.address = outpost_runtime::config::Bounded(70_000);
        let p = PointConfig::from(&raw);
        assert_eq!(p.address, u16::MAX);
        assert_eq!(p.validate().unwrap_err().key, "address");
    }

    #[test]
    fn validation_names_the_point_and_key() {
        let e = hr("a", 65533, DataType::F64).validate().unwrap_err();
        assert_eq!((e.point.as_str(), e.key), ("a", "address"));
        assert!(hr("a", 65532, DataType::F64).validate().is_ok());
        assert!(hr("a", 65535, DataType::U16).validate().is_ok());
        assert!(hr("a", 65535, DataType::U32).validate().is_err());
        assert_eq!(
            hr("a", 0, DataType::Bool).validate().unwrap_err().key,
            "type"
        );
        assert_eq!(
            point("c", Table::Coils, 0, DataType::U16)
                .validate()
                .unwrap_err()
                .key,
            "type"
        );
        assert_eq!(hr("", 0, DataType::U16).validate().unwrap_err().key, "name");
        let mut p = hr("a", 0, DataType::U16);
        p.scale = 0.0;
        assert_eq!(p.validate().unwrap_err().key, "scale");
        p.scale = 1.0;
        p.offset = f64::NAN;
        assert_eq!(p.validate().unwrap_err().key, "offset");
        let dup = [hr("a", 0, DataType::U16), hr("a", 5, DataType::U16)];
        assert_eq!(validate_points(&dup).unwrap_err().key, "name");
        assert!(
            BatchConfig {
                max_registers: 126,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(
            BatchConfig {
                max_bits: 0,
                ..Default::default()
            }
            .validate()
            .is_err()
        );
        assert!(BatchConfig::default().validate().is_ok());
    }

    #[test]
    fn contiguous_points_are_batched_per_table() {
        let pts = vec![
            hr("c", 4, DataType::F32),
            hr("a", 0, DataType::U16),
            hr("b", 1, DataType::U32),
            hr("d", 6, DataType::F64),
            point("ir", Table::InputRegisters, 0, DataType::I16),
            point("co1", Table::Coils, 10, DataType::Bool),
            point("co0", Table::Coils, 9, DataType::Bool),
            hr("far", 200, DataType::U16),
        ];
        let reqs = plan_reads(&pts, &BatchConfig::default());
        assert_eq!(
            spans(&reqs),
            vec![
                (Table::Coils, 9, 2),
                (Table::HoldingRegisters, 0, 3),
                (Table::HoldingRegisters, 4, 6),
                (Table::HoldingRegisters, 200, 1),
                (Table::InputRegisters, 0, 1),
            ]
        );
        assert_eq!(reqs[0].points, vec![6, 5]);
        assert_eq!(reqs[1].points, vec![1, 2]);
        assert_eq!(reqs[2].points, vec![0, 3]);
        // A gap of 1 (address 3) is bridged when allowed; 200 stays separate.
        let reqs = plan_reads(
            &pts,
            &BatchConfig {
                max_gap_registers: 1,
                ..Default::default()
            },
        );
        assert_eq!(
            spans(&reqs)[1..3],
            [
                (Table::HoldingRegisters, 0, 10),
                (Table::HoldingRegisters, 200, 1)
            ]
        );
        let reqs = plan_reads(
            &pts,
            &BatchConfig {
                max_gap_registers: 190,
                ..Default::default()
            },
        );
        // A wide gap allowance never breaks the 125-register limit: 0..201 stays split.
        assert_eq!(
            spans(&reqs)[1..3],
            [
                (Table::HoldingRegisters, 0, 10),
                (Table::HoldingRegisters, 200, 1)
            ]
        );
        let near: Vec<PointConfig> = vec![hr("x", 0, DataType::U16), hr("y", 100, DataType::U16)];
        let one = plan_reads(
            &near,
            &BatchConfig {
                max_gap_registers: 99,
                ..Default::default()
            },
        );
        assert_eq!(spans(&one), vec![(Table::HoldingRegisters, 0, 101)]);
        let two = plan_reads(
            &near,
            &BatchConfig {
                max_gap_registers: 98,
                ..Default::default()
            },
        );
        assert_eq!(two.len(), 2);
    }

    #[test]
    fn the_125_register_boundary() {
        // 125 contiguous u16: one request; the 126th starts a new one.
        let mut pts: Vec<PointConfig> = (0..125)
            .map(|i| hr(&format!("r{i}"), i, DataType::U16))
            .collect();
        assert_eq!(
            spans(&plan_reads(&pts, &BatchConfig::default())),
            vec![(Table::HoldingRegisters, 0, 125)]
        );
        pts.push(hr("r125", 125, DataType::U16));
        assert_eq!(
            spans(&plan_reads(&pts, &BatchConfig::default())),
            vec![
                (Table::HoldingRegisters, 0, 125),
                (Table::HoldingRegisters, 125, 1)
            ]
        );
        // An f32 straddling 125 is not split: it moves to the next request whole.
        let pts = vec![hr("a", 0, DataType::U16), hr("b", 124, DataType::F32)];
        assert_eq!(
            spans(&plan_reads(
                &pts,
                &BatchConfig {
                    max_gap_registers: 200,
                    ..Default::default()
                }
            )),
            vec![
                (Table::HoldingRegisters, 0, 1),
                (Table::HoldingRegisters, 124, 2)
            ]
        );
        // 2000 coils in one request, 2001 in two.
        let mut coils: Vec<PointConfig> = (0..2000)
            .map(|i| point(&format!("c{i}"), Table::Coils, i, DataType::Bool))
            .collect();
        assert_eq!(plan_reads(&coils, &BatchConfig::default()).len(), 1);
        coils.push(point("c2000", Table::Coils, 2000, DataType::Bool));
        assert_eq!(
            spans(&plan_reads(&coils, &BatchConfig::default())),
            vec![(Table::Coils, 0, 2000), (Table::Coils, 2000, 1)]
        );
        // A smaller configured limit is honoured.
        let pts: Vec<PointConfig> = (0..10)
            .map(|i| hr(&format!("r{i}"), i, DataType::U16))
            .collect();
        let reqs = plan_reads(
            &pts,
            &BatchConfig {
                max_registers: 4,
                ..Default::default()
            },
        );
        assert_eq!(
            spans(&reqs).iter().map(|s| s.2).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
    }

    #[test]
    fn overlapping_points_share_registers() {
        // The same registers read as u32 and as two u16 halves, and as f32 word-swapped.
        let mut swapped = hr("f", 10, DataType::F32);
        swapped.word_order = WordOrder::Little;
        let pts = vec![
            hr("whole", 10, DataType::U32),
            hr("hi", 10, DataType::U16),
            hr("lo", 11, DataType::U16),
            swapped,
        ];
        let reqs = plan_reads(&pts, &BatchConfig::default());
        assert_eq!(spans(&reqs), vec![(Table::HoldingRegisters, 10, 2)]);
        let vals = reqs[0]
            .decode(&pts, Response::Registers(&[0x3F80, 0x0000]))
            .unwrap();
        let by: std::collections::HashMap<usize, Value> = vals.into_iter().collect();
        assert_eq!(by[&0], Value::I64(0x3F80_0000));
        assert_eq!(by[&1], Value::I64(0x3F80));
        assert_eq!(by[&2], Value::I64(0));
        // Word-swapped: registers read as 0x0000_3F80, a tiny subnormal.
        assert_eq!(by[&3], Value::F64(f64::from(f32::from_bits(0x0000_3F80))));
    }

    #[test]
    fn addresses_near_65535_do_not_overflow() {
        let pts = vec![
            hr("last", 65535, DataType::U16),
            hr("f64", 65530, DataType::F64),
            hr("u32", 65534, DataType::U32),
            hr("bad", 65535, DataType::U32), // invalid: left out
            point("c", Table::Coils, 65535, DataType::Bool),
        ];
        let reqs = plan_reads(
            &pts,
            &BatchConfig {
                max_gap_registers: u16::MAX,
                max_gap_bits: u16::MAX,
                ..Default::default()
            },
        );
        assert_eq!(
            spans(&reqs),
            vec![
                (Table::Coils, 65535, 1),
                (Table::HoldingRegisters, 65530, 6)
            ]
        );
        let regs = [0, 0, 0, 0, 0xAAAA, 0xBBBB];
        let vals = reqs[1].decode(&pts, Response::Registers(&regs)).unwrap();
        assert_eq!(
            vals,
            vec![
                (1, Value::F64(0.0)),
                (2, Value::I64(0xAAAA_BBBB)),
                (0, Value::I64(0xBBBB))
            ]
        );
        let vals = reqs[0]
            .decode(
                &pts,
                Response::Bits(&[true, false, false, false, false, false, false, false]),
            )
            .unwrap();
        assert_eq!(vals, vec![(4, Value::Bool(true))]);
    }

    #[test]
    fn responses_are_checked_and_scaled() {
        let mut t = point("t", Table::InputRegisters, 0, DataType::I16);
        t.scale = 0.5;
        t.offset = 1.0;
        let pts = vec![t, point("n", Table::InputRegisters, 1, DataType::U16)];
        let reqs = plan_reads(&pts, &BatchConfig::default());
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(r.table.read_function_code(), 4);
        assert_eq!(
            r.decode(&pts, Response::Registers(&[(-4i16) as u16, 7]))
                .unwrap(),
            vec![(0, Value::F64(-1.0)), (1, Value::I64(7))]
        );
        assert_eq!(
            r.decode(&pts, Response::Registers(&[1])),
            Err(ResponseError::Length {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            r.decode(&pts, Response::Registers(&[1, 2, 3])),
            Err(ResponseError::Length {
                expected: 2,
                got: 3
            })
        );
        assert!(matches!(
            r.decode(&pts, Response::Bits(&[true, true])),
            Err(ResponseError::Kind(_))
        ));
        let coils = vec![point("c", Table::DiscreteInputs, 3, DataType::Bool)];
        let cr = &plan_reads(&coils, &BatchConfig::default())[0];
        assert_eq!(cr.table.read_function_code(), 2);
        assert!(matches!(
            cr.decode(&coils, Response::Bits(&[])),
            Err(ResponseError::Length { .. })
        ));
        assert!(matches!(
            cr.decode(&coils, Response::Registers(&[1])),
            Err(ResponseError::Kind(_))
        ));
    }

    /// Whether points `members` may form one request under `max` / `gap`.
    fn valid_block(pts: &[PointConfig], members: &[usize], max: u32, gap: u32) -> bool {
        let mut iv: Vec<(u32, u32)> = members
            .iter()
            .map(|&i| (u32::from(pts[i].address), pts[i].end()))
            .collect();
        iv.sort();
        let s = iv[0].0;
        let mut e = iv[0].1;
        for &(a, b) in &iv[1..] {
            if a > e + gap {
                return false;
            }
            e = e.max(b);
        }
        e - s <= max
    }

    /// Fewest blocks over every partition of the points (exhaustive).
    fn brute_force(pts: &[PointConfig], max: u32, gap: u32) -> usize {
        fn go(
            pts: &[PointConfig],
            i: usize,
            blocks: &mut Vec<Vec<usize>>,
            best: &mut usize,
            max: u32,
            gap: u32,
        ) {
            if blocks.len() >= *best {
                return;
            }
            if i == pts.len() {
                if blocks.iter().all(|b| valid_block(pts, b, max, gap)) {
                    *best = blocks.len();
                }
                return;
            }
            for k in 0..blocks.len() {
                blocks[k].push(i);
                go(pts, i + 1, blocks, best, max, gap);
                blocks[k].pop();
            }
            blocks.push(vec![i]);
            go(pts, i + 1, blocks, best, max, gap);
            blocks.pop();
        }
        let mut best = pts.len() + 1;
        go(pts, 0, &mut Vec::new(), &mut best, max, gap);
        best
    }

    #[test]
    fn planning_is_minimal_against_brute_force_on_small_cases() {
        let types = [DataType::U16, DataType::U32, DataType::F64];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..300 {
            let (max, gap) = (4 + (case % 3) as u16, (case % 4) as u16);
            let batch = BatchConfig {
                max_registers: max,
                max_gap_registers: gap,
                ..Default::default()
            };
            let n = 1 + (next() % 7) as usize;
            let pts: Vec<PointConfig> = (0..n)
                .map(|i| {
                    hr(
                        &format!("p{i}"),
                        (next() % 16) as u16,
                        types[(next() % 3) as usize],
                    )
                })
                .collect();
            let reqs = plan_reads(&pts, &batch);
            // Every point is covered exactly once, inside its request, within the limits.
            let mut covered: Vec<usize> = reqs.iter().flat_map(|r| r.points.clone()).collect();
            covered.sort();
            assert_eq!(covered, (0..pts.len()).collect::<Vec<_>>());
            for r in &reqs {
                assert!(r.count <= max);
                assert!(valid_block(&pts, &r.points, u32::from(max), u32::from(gap)));
                for &i in &r.points {
                    assert!(pts[i].address >= r.address);
                    assert!(pts[i].end() <= u32::from(r.address) + u32::from(r.count));
                }
            }
            assert_eq!(
                reqs.len(),
                brute_force(&pts, u32::from(max), u32::from(gap)),
                "{pts:?}"
            );
        }
    }
}

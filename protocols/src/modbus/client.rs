//! Modbus TCP client (tokio-modbus) with the guards tokio-modbus leaves to its user:
//!
//! - a timeout on connecting and on **every** request (tokio-modbus has none);
//! - after a timeout or any transport or framing error the connection is dropped and
//!   re-opened by the next request, because a late or partial reply would otherwise be
//!   taken for the answer to the next request;
//! - an exception response is a device answer, returned as `Ok(Err(Exception))`, never an
//!   error of the connection;
//! - answers are checked against the request (register and bit counts, write echoes) here,
//!   instead of by tokio-modbus' `Reader`/`Writer` helpers, whose checks are
//!   `debug_assert!`s that would panic on a misbehaving device.
//!
//! Reads (FC 1–4) take a planned [`ReadRequest`]; writes are FC 5, 6, 15 and 16.

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::{ExceptionCode, Request, Response as MbResponse, Slave};

use super::{MAX_READ_BITS, MAX_READ_REGISTERS, ReadRequest, Response, Table};

/// Most coils one FC 15 request may write (Modbus application protocol §6.11).
pub const MAX_WRITE_BITS: usize = 1968;
/// Most registers one FC 16 request may write (§6.12).
pub const MAX_WRITE_REGISTERS: usize = 123;

/// A Modbus exception code: the device understood the request and refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Exception(pub u8);

impl Exception {
    /// The code's name in the Modbus specification (`"unknown"` for others).
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "illegal function",
            2 => "illegal data address",
            3 => "illegal data value",
            4 => "server device failure",
            5 => "acknowledge",
            6 => "server device busy",
            8 => "memory parity error",
            10 => "gateway path unavailable",
            11 => "gateway target device failed to respond",
            _ => "unknown",
        }
    }
}

impl std::fmt::Display for Exception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exception {} ({})", self.0, self.name())
    }
}

impl From<ExceptionCode> for Exception {
    fn from(c: ExceptionCode) -> Exception {
        Exception(u8::from(c))
    }
}

/// Why a request got no usable answer. Every variant but `InvalidRequest` leaves the client
/// disconnected; the next request reconnects.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address did not resolve to any socket address.
    #[error("cannot resolve {addr:?}: {reason}")]
    Resolve {
        /// The configured `host:port`.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// Connecting failed (refused, unreachable, ...).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// Connecting took longer than the timeout.
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The address tried.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection broke (reset, closed by the device, ...).
    #[error("connection failed: {0}")]
    Transport(io::Error),
    /// An answer that is not a valid answer to the request: a malformed frame, a wrong
    /// transaction id or function code, a wrong count or a wrong write echo.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// The request itself is out of the protocol's limits (nothing was sent).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// A short label for metrics (`kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Resolve { .. }
            | ClientError::Connect { .. }
            | ClientError::ConnectTimeout { .. } => "connect",
            ClientError::Timeout(_) => "timeout",
            ClientError::Transport(_) => "transport",
            ClientError::Malformed(_) => "malformed",
            ClientError::InvalidRequest(_) => "invalid_request",
        }
    }

    /// Whether the error happened while (re)connecting: the device is unreachable.
    pub fn is_connect(&self) -> bool {
        self.kind() == "connect"
    }
}

/// The result of one request: transport failure, or the device's answer (which may be an
/// exception).
pub type ModbusResult<T> = Result<Result<T, Exception>, ClientError>;

/// The data of a successful read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadData {
    /// FC 3/4: exactly the requested number of registers.
    Registers(Vec<u16>),
    /// FC 1/2: exactly the requested number of bits (padding removed).
    Bits(Vec<bool>),
}

impl ReadData {
    /// The view [`ReadRequest::decode`] takes.
    pub fn as_response(&self) -> Response<'_> {
        match self {
            ReadData::Registers(r) => Response::Registers(r),
            ReadData::Bits(b) => Response::Bits(b),
        }
    }
}

/// A Modbus TCP connection to one unit, re-opened on demand.
pub struct ModbusTcpClient {
    addr: SocketAddr,
    unit: u8,
    timeout: Duration,
    ctx: Option<Context>,
}

impl std::fmt::Debug for ModbusTcpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusTcpClient")
            .field("addr", &self.addr)
            .field("unit", &self.unit)
            .field("timeout", &self.timeout)
            .field("connected", &self.ctx.is_some())
            .finish()
    }
}

/// Resolves `host:port` (within `timeout`) to its first socket address.
pub async fn resolve(addr: &str, timeout: Duration) -> Result<SocketAddr, ClientError> {
    let err = |reason: String| ClientError::Resolve {
        addr: addr.to_owned(),
        reason,
    };
    match tokio::time::timeout(timeout, tokio::net::lookup_host(addr)).await {
        Err(_) => Err(err(format!("no answer within {timeout:?}"))),
        Ok(Err(e)) => Err(err(e.to_string())),
        Ok(Ok(mut it)) => it.next().ok_or_else(|| err("no address".into())),
    }
}

impl ModbusTcpClient {
    /// Resolves `addr` (`host:port`) and connects to unit `unit`; `timeout` bounds the
    /// resolution, the connection and, later, every request.
    pub async fn connect(
        addr: &str,
        unit: u8,
        timeout: Duration,
    ) -> Result<ModbusTcpClient, ClientError> {
        let addr = resolve(addr, timeout).await?;
        let mut c = ModbusTcpClient {
            addr,
            unit,
            timeout,
            ctx: None,
        };
        c.ensure_connected().await?;
        Ok(c)
    }

    /// The device's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether a connection is open (it is re-opened by the next request otherwise).
    pub fn is_connected(&self) -> bool {
        self.ctx.is_some()
    }

    /// Drops the connection; the next request opens a new one.
    pub fn disconnect(&mut self) {
        self.ctx = None;
    }

    async fn ensure_connected(&mut self) -> Result<&mut Context, ClientError> {
        if self.ctx.is_none() {
            let stream =
                match tokio::time::timeout(self.timeout, TcpStream::connect(self.addr)).await {
                    Err(_) => {
                        return Err(ClientError::ConnectTimeout {
                            addr: self.addr,
                            timeout: self.timeout,
                        });
                    }
                    Ok(Err(source)) => {
                        return Err(ClientError::Connect {
                            addr: self.addr,
                            source,
                        });
                    }
                    Ok(Ok(s)) => s,
                };
            // Small request/response frames: do not wait for Nagle.
            let _ = stream.set_nodelay(true);
            self.ctx = Some(tokio_modbus::client::tcp::attach_slave(
                stream,
                Slave(self.unit),
            ));
        }
        // Just set if it was None.
        self.ctx
            .as_mut()
            .ok_or_else(|| ClientError::Transport(io::Error::other("not connected")))
    }

    /// Sends one request (connecting first if needed) and waits at most the timeout for the
    /// answer. Any failure but an exception drops the connection.
    async fn call(&mut self, req: Request<'_>) -> ModbusResult<MbResponse> {
        let timeout = self.timeout;
        let ctx = self.ensure_connected().await?;
        let res = tokio::time::timeout(timeout, ctx.call(req)).await;
        let err = match res {
            Ok(Ok(Ok(rsp))) => return Ok(Ok(rsp)),
            Ok(Ok(Err(code))) => return Ok(Err(code.into())),
            Err(_) => ClientError::Timeout(timeout),
            Ok(Err(tokio_modbus::Error::Transport(e))) => match e.kind() {
                io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => {
                    ClientError::Malformed(e.to_string())
                }
                _ => ClientError::Transport(e),
            },
            Ok(Err(tokio_modbus::Error::Protocol(e))) => ClientError::Malformed(e.to_string()),
        };
        // A late or partial reply must never be read as the answer to the next request.
        self.ctx = None;
        Err(err)
    }

    /// Marks the connection broken and returns a malformed-answer error.
    fn malformed<T>(&mut self, what: String) -> ModbusResult<T> {
        self.ctx = None;
        Err(ClientError::Malformed(what))
    }

    /// Reads a planned request (FC 1–4). The data holds exactly `req.count` values.
    pub async fn read(&mut self, req: &ReadRequest) -> ModbusResult<ReadData> {
        let (addr, count) = (req.address, req.count);
        let max = req.table.max_read();
        if count == 0 || count > max || u32::from(addr) + u32::from(count) > 65_536 {
            return Err(ClientError::InvalidRequest(format!(
                "read of {count} {} at {addr}: count must be 1..={max} within the address space",
                req.table.as_str()
            )));
        }
        let request = match req.table {
            Table::Coils => Request::ReadCoils(addr, count),
            Table::DiscreteInputs => Request::ReadDiscreteInputs(addr, count),
            Table::HoldingRegisters => Request::ReadHoldingRegisters(addr, count),
            Table::InputRegisters => Request::ReadInputRegisters(addr, count),
        };
        let rsp = match self.call(request).await? {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let n = usize::from(count);
        match rsp {
            MbResponse::ReadHoldingRegisters(regs) | MbResponse::ReadInputRegisters(regs) => {
                if regs.len() != n {
                    return self.malformed(format!(
                        "{} registers in the answer to a read of {n}",
                        regs.len()
                    ));
                }
                Ok(Ok(ReadData::Registers(regs)))
            }
            MbResponse::ReadCoils(mut bits) | MbResponse::ReadDiscreteInputs(mut bits) => {
                // Bits come padded to whole bytes: at most 7 extra.
                if bits.len() < n || bits.len() > n.div_ceil(8) * 8 {
                    return self.malformed(format!(
                        "{} bits in the answer to a read of {n}",
                        bits.len()
                    ));
                }
                bits.truncate(n);
                Ok(Ok(ReadData::Bits(bits)))
            }
            other => self.malformed(format!("unexpected answer {other:?}")),
        }
    }

    /// FC 5: writes one coil.
    pub async fn write_single_coil(&mut self, addr: u16, value: bool) -> ModbusResult<()> {
        match self.call(Request::WriteSingleCoil(addr, value)).await? {
            Err(e) => Ok(Err(e)),
            Ok(MbResponse::WriteSingleCoil(a, v)) if a == addr && v == value => Ok(Ok(())),
            Ok(other) => self.malformed(format!("write echo {other:?} does not match")),
        }
    }

    /// FC 6: writes one register.
    pub async fn write_single_register(&mut self, addr: u16, value: u16) -> ModbusResult<()> {
        match self.call(Request::WriteSingleRegister(addr, value)).await? {
            Err(e) => Ok(Err(e)),
            Ok(MbResponse::WriteSingleRegister(a, v)) if a == addr && v == value => Ok(Ok(())),
            Ok(other) => self.malformed(format!("write echo {other:?} does not match")),
        }
    }

    /// FC 15: writes 1..=1968 consecutive coils.
    pub async fn write_multiple_coils(&mut self, addr: u16, values: &[bool]) -> ModbusResult<()> {
        check_write(addr, values.len(), MAX_WRITE_BITS, "coils")?;
        let req = Request::WriteMultipleCoils(addr, Cow::Borrowed(values));
        match self.call(req).await? {
            Err(e) => Ok(Err(e)),
            Ok(MbResponse::WriteMultipleCoils(a, n))
                if a == addr && usize::from(n) == values.len() =>
            {
                Ok(Ok(()))
            }
            Ok(other) => self.malformed(format!("write echo {other:?} does not match")),
        }
    }

    /// FC 16: writes 1..=123 consecutive registers.
    pub async fn write_multiple_registers(
        &mut self,
        addr: u16,
        values: &[u16],
    ) -> ModbusResult<()> {
        check_write(addr, values.len(), MAX_WRITE_REGISTERS, "registers")?;
        let req = Request::WriteMultipleRegisters(addr, Cow::Borrowed(values));
        match self.call(req).await? {
            Err(e) => Ok(Err(e)),
            Ok(MbResponse::WriteMultipleRegisters(a, n))
                if a == addr && usize::from(n) == values.len() =>
            {
                Ok(Ok(()))
            }
            Ok(other) => self.malformed(format!("write echo {other:?} does not match")),
        }
    }
}

fn check_write(addr: u16, n: usize, max: usize, what: &str) -> Result<(), ClientError> {
    if n == 0 || n > max || usize::from(addr) + n > 65_536 {
        return Err(ClientError::InvalidRequest(format!(
            "write of {n} {what} at {addr}: count must be 1..={max} within the address space"
        )));
    }
    Ok(())
}

// Keep the read limits the planner uses and the client checks in one place.
const _: () = assert!(MAX_READ_REGISTERS == 125 && MAX_READ_BITS == 2000);

#[cfg(test)]
mod tests {
    //! Against a scripted raw TCP peer: every answer (good, exception, garbage, truncated,
    //! silent) is bytes we choose, so each failure path is exercised deterministically.
    use super::*;
    use crate::modbus::{BatchConfig, DataType, PointConfig, plan_reads};
    use outpost_runtime::model::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// What the peer does with each request: `Pdu(pdu)` answers with that PDU under the
    /// request's header; `Raw(bytes)` writes bytes as they are; `Silent` says nothing;
    /// `RawClose(bytes)` writes them and closes the connection.
    #[derive(Clone)]
    enum Act {
        Pdu(Vec<u8>),
        Raw(Vec<u8>),
        Silent,
        /// Writes the bytes, then closes the connection.
        RawClose(Vec<u8>),
    }

    /// Serves one scripted action per request, across connections, in order. Returns the
    /// address and a channel of (connection number, request PDU) seen.
    async fn peer(
        script: Vec<Act>,
    ) -> (
        SocketAddr,
        tokio::sync::mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut script = script.into_iter();
            let mut conn_no = 0;
            'conns: loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                conn_no += 1;
                loop {
                    let mut hdr = [0u8; 7];
                    if s.read_exact(&mut hdr).await.is_err() {
                        continue 'conns;
                    }
                    let len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
                    let mut pdu = vec![0u8; len.saturating_sub(1)];
                    if s.read_exact(&mut pdu).await.is_err() {
                        continue 'conns;
                    }
                    let _ = tx.send((conn_no, pdu));
                    match script.next() {
                        Some(Act::Pdu(p)) => {
                            let mut out = hdr[..4].to_vec();
                            out.extend_from_slice(&((p.len() + 1) as u16).to_be_bytes());
                            out.push(hdr[6]);
                            out.extend_from_slice(&p);
                            let _ = s.write_all(&out).await;
                        }
                        Some(Act::Raw(b)) => {
                            let _ = s.write_all(&b).await;
                        }
                        Some(Act::Silent) => {}
                        Some(Act::RawClose(b)) => {
                            let _ = s.write_all(&b).await;
                            continue 'conns;
                        }
                        None => continue 'conns,
                    }
                }
            }
        });
        (addr, rx)
    }

    fn hr_req(address: u16, count: u16) -> ReadRequest {
        ReadRequest {
            table: Table::HoldingRegisters,
            address,
            count,
            points: vec![],
        }
    }

    const T: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn reads_decode_and_exceptions_are_answers() {
        let (addr, mut seen) = peer(vec![
            Act::Pdu(vec![3, 4, 0x42, 0xF6, 0xE9, 0x79]),
            Act::Pdu(vec![0x83, 2]),
            // 3 coils asked, a whole byte (8 bits) answered: padding is dropped.
            Act::Pdu(vec![1, 1, 0b0000_0101]),
            Act::Pdu(vec![6, 0, 9, 0x12, 0x34]),
            Act::Pdu(vec![5, 0, 1, 0xFF, 0]),
            Act::Pdu(vec![0x10, 0, 2, 0, 3]),
            Act::Pdu(vec![0x0F, 0, 4, 0, 10]),
        ])
        .await;
        let mut c = ModbusTcpClient::connect(&addr.to_string(), 7, T)
            .await
            .unwrap();
        let pts = vec![PointConfig {
            name: "t".into(),
            table: Table::HoldingRegisters,
            address: 0,
            data_type: DataType::F32,
            word_order: crate::modbus::WordOrder::Big,
            byte_order: crate::modbus::ByteOrder::Big,
            scale: 1.0,
            offset: 0.0,
        }];
        let req = &plan_reads(&pts, &BatchConfig::default())[0];
        let data = c.read(req).await.unwrap().unwrap();
        assert_eq!(data, ReadData::Registers(vec![0x42F6, 0xE979]));
        assert_eq!(
            req.decode(&pts, data.as_response()).unwrap(),
            vec![(0, Value::F64(f64::from(123.456f32)))]
        );
        assert_eq!(seen.recv().await.unwrap(), (1, vec![3, 0, 0, 0, 2]));
        let e = c.read(&hr_req(100, 1)).await.unwrap().unwrap_err();
        assert_eq!(e, Exception(2));
        assert_eq!(e.name(), "illegal data address");
        assert!(c.is_connected(), "an exception keeps the connection");
        let coils = ReadRequest {
            table: Table::Coils,
            address: 0,
            count: 3,
            points: vec![],
        };
        assert_eq!(
            c.read(&coils).await.unwrap().unwrap(),
            ReadData::Bits(vec![true, false, true])
        );
        c.write_single_register(9, 0x1234).await.unwrap().unwrap();
        c.write_single_coil(1, true).await.unwrap().unwrap();
        c.write_multiple_registers(2, &[1, 2, 3])
            .await
            .unwrap()
            .unwrap();
        c.write_multiple_coils(4, &[true; 10])
            .await
            .unwrap()
            .unwrap();
        let pdus: Vec<Vec<u8>> = std::iter::from_fn(|| seen.try_recv().ok())
            .map(|(conn, p)| {
                assert_eq!(conn, 1);
                p
            })
            .collect();
        assert_eq!(pdus[0], vec![3, 0, 100, 0, 1]);
        assert_eq!(pdus[2], vec![6, 0, 9, 0x12, 0x34]);
        assert_eq!(pdus[3], vec![5, 0, 1, 0xFF, 0]);
        assert_eq!(pdus[4], vec![0x10, 0, 2, 0, 3, 6, 0, 1, 0, 2, 0, 3]);
        assert_eq!(pdus[5], vec![0x0F, 0, 4, 0, 10, 2, 0xFF, 0x03]);
        // Out-of-limit requests are refused before anything is sent.
        assert!(matches!(
            c.read(&hr_req(0, 126)).await,
            Err(ClientError::InvalidRequest(_))
        ));
        assert!(matches!(
            c.read(&hr_req(65535, 2)).await,
            Err(ClientError::InvalidRequest(_))
        ));
        assert!(matches!(
            c.write_multiple_registers(0, &[0; 124]).await,
            Err(ClientError::InvalidRequest(_))
        ));
        assert!(matches!(
            c.write_multiple_coils(0, &[]).await,
            Err(ClientError::InvalidRequest(_))
        ));
        assert!(c.is_connected());
    }

    #[tokio::test]
    async fn bad_answers_are_errors_and_the_next_request_reconnects() {
        let good = Act::Pdu(vec![3, 2, 0, 42]);
        let (addr, mut seen) = peer(vec![
            // Garbage: a wrong protocol id.
            Act::Raw(vec![0xDE, 0xAD, 0xBE, 0xEF, 0, 3, 1, 3, 2]),
            good.clone(),
            // Truncated: the header announces 5 bytes, 2 come, then silence → timeout.
            Act::Raw(vec![0, 1, 0, 0, 0, 6, 1, 3, 2]),
            good.clone(),
            // Truncated, then the peer closes.
            Act::RawClose(vec![0, 0, 0, 0, 0, 6, 1]),
            good.clone(),
            // Wrong register count for the request.
            Act::Pdu(vec![3, 4, 0, 1, 0, 2]),
            good.clone(),
            // Wrong function code.
            Act::Pdu(vec![4, 2, 0, 1]),
            good.clone(),
            // Odd byte count.
            Act::Pdu(vec![3, 3, 0, 1, 2]),
            good.clone(),
            // Silence.
            Act::Silent,
            good.clone(),
            // Write echo of another address.
            Act::Pdu(vec![6, 0, 8, 0, 1]),
            good.clone(),
            // A coil read answered with more bytes than the padding allows.
            Act::Pdu(vec![1, 2, 0xFF, 0xFF]),
            good.clone(),
        ])
        .await;
        let mut c = ModbusTcpClient::connect(&addr.to_string(), 1, T)
            .await
            .unwrap();
        let mut kinds = Vec::new();
        for i in 0..9 {
            let r = if i == 7 {
                c.write_single_register(9, 1)
                    .await
                    .map(|r| r.map(|_| ReadData::Bits(vec![])))
            } else if i == 8 {
                c.read(&ReadRequest {
                    table: Table::Coils,
                    address: 0,
                    count: 3,
                    points: vec![],
                })
                .await
            } else {
                c.read(&hr_req(0, 1)).await
            };
            let e = r.expect_err("a bad answer is an error");
            kinds.push(e.kind());
            assert!(!c.is_connected(), "{e}");
            assert_eq!(
                c.read(&hr_req(0, 1)).await.unwrap().unwrap(),
                ReadData::Registers(vec![42]),
                "after bad answer {i}"
            );
        }
        assert_eq!(
            kinds,
            vec![
                "malformed",
                "timeout",
                "transport",
                "malformed",
                "malformed",
                "malformed",
                "timeout",
                "malformed",
                "malformed"
            ]
        );
        // Each bad answer cost its connection: 1 + 9 reconnections.
        let conns: Vec<usize> = std::iter::from_fn(|| seen.try_recv().ok())
            .map(|(n, _)| n)
            .collect();
        assert_eq!(conns.iter().max(), Some(&10));
    }

    #[tokio::test]
    async fn unreachable_devices_fail_to_connect() {
        // A port that was just free: connection refused.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = ModbusTcpClient::connect(&addr.to_string(), 1, T)
            .await
            .unwrap_err();
        assert!(e.is_connect(), "{e}");
        let e = ModbusTcpClient::connect("no-port-here", 1, T)
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Resolve { .. }), "{e}");
    }
}

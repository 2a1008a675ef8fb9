//! Certificates for the QUIC uplink's mutual TLS, for trying Outpost out.
//!
//! One self-signed CA signs a hub (server) certificate and one client certificate per
//! gateway. A gateway certificate carries the gateway id as its subject CN (and as a DNS
//! SAN when the id is a valid DNS name): the hub takes the gateway's identity from it.
//! Keys are ECDSA P-256. Certificates are valid from one day before generation (a gateway
//! clock that lags a little must not reject a fresh hub certificate); the CA for
//! [`CA_VALIDITY_DAYS`], the others for [`LEAF_VALIDITY_DAYS`].
//!
//! The binary exposes this as:
//!
//! ```text
//! outpost certs --out DIR --hub-name NAME [--hub-name NAME...] --gateway ID [--gateway ID...]
//! ```
//!
//! which writes into `DIR` (created if missing; existing files are never overwritten):
//! `ca.pem`, `ca.key`, `hub.pem`, `hub.key`, and `<ID>.pem`, `<ID>.key` per gateway.
//! Private keys are created with mode 0600. Give the hub `ca.pem`, `hub.pem`, `hub.key`;
//! give each gateway `ca.pem` and its own pair; keep `ca.key` offline. The hub's
//! `--hub-name` values are the names (DNS names or IP addresses) gateways use for it, e.g.
//! `--hub-name outpost-hub --hub-name localhost --hub-name 127.0.0.1`.
//!
//! Generation is pure ([`generate_pem`], [`CertificateAuthority`]); only
//! [`generate_bundle`] touches the file system.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{DnsName, ServerName};
use time::{OffsetDateTime, Time};

use outpost_runtime::config::GatewayId;

/// Days the CA certificate is valid for.
pub const CA_VALIDITY_DAYS: u64 = 3650;
/// Days hub and gateway certificates are valid for.
pub const LEAF_VALIDITY_DAYS: u64 = 825;
/// How far before "now" certificates start being valid.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);

/// File names the bundle reserves for the CA and the hub; no gateway may be called so.
const RESERVED_NAMES: [&str; 2] = ["ca", "hub"];

/// What can go wrong while generating or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The hub certificate needs at least one name.
    #[error("the hub certificate needs at least one name (a DNS name or an IP address)")]
    NoHubName,
    /// A hub name is neither a DNS name nor an IP address.
    #[error("invalid hub name {0:?}: expected a DNS name (e.g. outpost-hub) or an IP address")]
    InvalidHubName(String),
    /// A gateway id would collide with the CA's or the hub's files.
    #[error("gateway id {0:?} is reserved (its files would replace the CA's or the hub's)")]
    ReservedGatewayId(String),
    /// The same gateway id (ignoring case, as some file systems do) was given twice.
    #[error("gateway id {0:?} given twice (ids are compared ignoring case)")]
    DuplicateGatewayId(String),
    /// rcgen refused to build or sign a certificate.
    #[error("generating the {what} certificate failed: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// A file of the bundle is already there; nothing was written.
    #[error("{0} already exists: refusing to overwrite certificates or keys")]
    Exists(PathBuf),
    /// Creating the output folder or writing a file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedPem {
    /// The certificate, PEM (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A gateway's certificate and key.
#[derive(Debug, Clone)]
pub struct GatewayPem {
    /// The gateway id (subject CN of the certificate).
    pub id: GatewayId,
    /// Certificate and key.
    pub pem: CertifiedPem,
}

/// A whole set of certificates, in memory.
#[derive(Debug, Clone)]
pub struct BundlePem {
    /// The CA certificate and key.
    pub ca: CertifiedPem,
    /// The hub's server certificate and key.
    pub hub: CertifiedPem,
    /// One client certificate per gateway, in the order given.
    pub gateways: Vec<GatewayPem>,
}

/// Where [`generate_bundle`] wrote a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The output folder.
    pub dir: PathBuf,
    /// `ca.pem`.
    pub ca_cert: PathBuf,
    /// `ca.key` (0600).
    pub ca_key: PathBuf,
    /// `hub.pem`.
    pub hub_cert: PathBuf,
    /// `hub.key` (0600).
    pub hub_key: PathBuf,
    /// One entry per gateway, in the order given.
    pub gateways: Vec<GatewayFiles>,
}

/// A gateway's files in a [`Bundle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayFiles {
    /// The gateway id.
    pub id: GatewayId,
    /// `<id>.pem`.
    pub cert: PathBuf,
    /// `<id>.key` (0600).
    pub key: PathBuf,
}

/// A certificate authority held in memory: its certificate and its signing key.
pub struct CertificateAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed CA named `common_name`, with a fresh key.
    pub fn new(common_name: &str) -> Result<Self, CertError> {
        let what = || "CA".to_string();
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: what(),
            source,
        })?;
        let mut params = base_params(common_name, CA_VALIDITY_DAYS);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer =
            CertifiedIssuer::self_signed(params, key).map_err(|source| CertError::Generate {
                what: what(),
                source,
            })?;
        Ok(Self { issuer })
    }

    /// The CA certificate and its private key, PEM.
    pub fn pem(&self) -> CertifiedPem {
        CertifiedPem {
            cert_pem: self.issuer.pem(),
            key_pem: self.issuer.key().serialize_pem(),
        }
    }

    /// The CA certificate alone, PEM (what hubs and gateways trust).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A hub (TLS server) certificate valid for `names`: DNS names or IP addresses.
    pub fn issue_hub(&self, names: &[String]) -> Result<CertifiedPem, CertError> {
        if names.is_empty() {
            return Err(CertError::NoHubName);
        }
        let mut sans = Vec::with_capacity(names.len());
        for name in names {
            sans.push(hub_san(name)?);
        }
        let mut params = base_params(&names[0], LEAF_VALIDITY_DAYS);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, "hub")
    }

    /// A gateway (TLS client) certificate whose subject CN is `gateway_id`.
    pub fn issue_gateway(&self, gateway_id: &GatewayId) -> Result<CertifiedPem, CertError> {
        let gateway_id = gateway_id.as_str();
        let mut params = base_params(gateway_id, LEAF_VALIDITY_DAYS);
        if DnsName::try_from(gateway_id).is_ok() && gateway_id.parse::<IpAddr>().is_err() {
            let name = gateway_id
                .to_string()
                .try_into()
                .map_err(|source| CertError::Generate {
                    what: format!("gateway {gateway_id:?}"),
                    source,
                })?;
            params.subject_alt_names = vec![SanType::DnsName(name)];
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, &format!("gateway {gateway_id:?}"))
    }

    fn sign(&self, params: CertificateParams, what: &str) -> Result<CertifiedPem, CertError> {
        let err = |source| CertError::Generate {
            what: what.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(CertifiedPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Generates a CA, a hub certificate for `hub_names` and one certificate per gateway id,
/// in memory. Checks every name and id before generating anything.
pub fn generate_pem(hub_names: &[String], gateways: &[GatewayId]) -> Result<BundlePem, CertError> {
    check_names(hub_names, gateways)?;
    let ca = CertificateAuthority::new("Outpost CA")?;
    let hub = ca.issue_hub(hub_names)?;
    let gateways = gateways
        .iter()
        .map(|id| {
            Ok(GatewayPem {
                id: id.clone(),
                pem: ca.issue_gateway(id)?,
            })
        })
        .collect::<Result<Vec<_>, CertError>>()?;
    Ok(BundlePem {
        ca: ca.pem(),
        hub,
        gateways,
    })
}

/// Generates a bundle (see [`generate_pem`]) and writes it into `out_dir` (created if
/// missing): `ca.pem`, `ca.key`, `hub.pem`, `hub.key`, `<gateway>.pem`, `<gateway>.key`.
/// Keys get mode 0600, certificates 0644. Refuses, before writing anything, when one of
/// these files already exists.
pub fn generate_bundle(
    out_dir: &Path,
    hub_names: &[String],
    gateways: &[GatewayId],
) -> Result<Bundle, CertError> {
    check_names(hub_names, gateways)?;
    let bundle = Bundle {
        dir: out_dir.to_path_buf(),
        ca_cert: out_dir.join("ca.pem"),
        ca_key: out_dir.join("ca.key"),
        hub_cert: out_dir.join("hub.pem"),
        hub_key: out_dir.join("hub.key"),
        gateways: gateways
            .iter()
            .map(|id| GatewayFiles {
                id: id.clone(),
                cert: out_dir.join(format!("{id}.pem")),
                key: out_dir.join(format!("{id}.key")),
            })
            .collect(),
    };
    let mut targets = vec![
        &bundle.ca_cert,
        &bundle.ca_key,
        &bundle.hub_cert,
        &bundle.hub_key,
    ];
    for g in &bundle.gateways {
        targets.push(&g.cert);
        targets.push(&g.key);
    }
    if let Some(existing) = targets.iter().find(|p| p.exists()) {
        return Err(CertError::Exists(existing.to_path_buf()));
    }

    let pem = generate_pem(hub_names, gateways)?;
    fs::create_dir_all(out_dir).map_err(|source| CertError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    write_new(&bundle.ca_cert, &pem.ca.cert_pem, false)?;
    write_new(&bundle.ca_key, &pem.ca.key_pem, true)?;
    write_new(&bundle.hub_cert, &pem.hub.cert_pem, false)?;
    write_new(&bundle.hub_key, &pem.hub.key_pem, true)?;
    for (files, g) in bundle.gateways.iter().zip(&pem.gateways) {
        write_new(&files.cert, &g.pem.cert_pem, false)?;
        write_new(&files.key, &g.pem.key_pem, true)?;
    }
    Ok(bundle)
}

/// Checks hub names (valid) and gateway ids (not reserved, no duplicates).
fn check_names(hub_names: &[String], gateways: &[GatewayId]) -> Result<(), CertError> {
    if hub_names.is_empty() {
        return Err(CertError::NoHubName);
    }
    for name in hub_names {
        hub_san(name)?;
    }
    let mut seen: Vec<String> = Vec::with_capacity(gateways.len());
    for id in gateways {
        let folded = id.to_ascii_lowercase();
        if RESERVED_NAMES.contains(&folded.as_str()) {
            return Err(CertError::ReservedGatewayId(id.to_string()));
        }
        if seen.contains(&folded) {
            return Err(CertError::DuplicateGatewayId(id.to_string()));
        }
        seen.push(folded);
    }
    Ok(())
}

/// The SAN for one hub name: an IP address, or a DNS name as rustls would accept it as a
/// server name.
fn hub_san(name: &str) -> Result<SanType, CertError> {
    let invalid = || CertError::InvalidHubName(name.to_string());
    match ServerName::try_from(name).map_err(|_| invalid())? {
        ServerName::IpAddress(_) => name
            .parse::<IpAddr>()
            .map(SanType::IpAddress)
            .map_err(|_| invalid()),
        ServerName::DnsName(_) => Ok(SanType::DnsName(
            name.to_string().try_into().map_err(|_| invalid())?,
        )),
        _ => Err(invalid()),
    }
}

/// Parameters shared by all certificates: subject `CN=<cn>, O=Outpost` and validity from
/// one day ago for `days` days.
fn base_params(common_name: &str, days: u64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Outpost");
    params.distinguished_name = dn;
    (params.not_before, params.not_after) = validity(OffsetDateTime::now_utc(), days);
    params
}

/// Validity of a certificate made at `now` for `days` days, in whole days (midnight UTC):
/// from the day before `now` to the day `days` after it.
fn validity(now: OffsetDateTime, days: u64) -> (OffsetDateTime, OffsetDateTime) {
    let midnight = |t: OffsetDateTime| t.replace_time(Time::MIDNIGHT);
    let days = i64::try_from(days).unwrap_or(i64::MAX);
    let end = now
        .checked_add(time::Duration::days(days.min(3_650_000)))
        .unwrap_or(now);
    (midnight(now - BACKDATE), midnight(end))
}

/// Writes `contents` to a new file (never replacing one); `secret` files get mode 0600.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            io(e)
        }
    })?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn ids(v: &[&str]) -> Vec<GatewayId> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn validity_is_whole_days_from_the_day_before() {
        use time::Month;
        let at = |y, m, d, h| {
            time::Date::from_calendar_date(y, m, d)
                .unwrap()
                .with_hms(h, 30, 0)
                .unwrap()
                .assume_utc()
        };
        let day = |y, m, d| at(y, m, d, 0).replace_time(Time::MIDNIGHT);
        assert_eq!(
            validity(at(2024, Month::March, 1, 0), 1),
            (day(2024, Month::February, 29), day(2024, Month::March, 2))
        );
        assert_eq!(
            validity(at(2026, Month::January, 1, 23), LEAF_VALIDITY_DAYS),
            (day(2025, Month::December, 31), day(2028, Month::April, 5))
        );
        assert_eq!(
            validity(at(1970, Month::January, 2, 12), CA_VALIDITY_DAYS).0,
            day(1970, Month::January, 1)
        );
    }

    #[test]
    fn in_memory_bundle_parses() {
        let b = generate_pem(
            &names(&["outpost-hub", "127.0.0.1"]),
            &ids(&["gw-1", "gw_2"]),
        )
        .unwrap();
        for pem in [&b.ca, &b.hub, &b.gateways[0].pem, &b.gateways[1].pem] {
            let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(certs.len(), 1);
            PrivateKeyDer::from_pem_slice(pem.key_pem.as_bytes()).unwrap();
        }
        assert_eq!(b.gateways[1].id, "gw_2");
        assert!(
            !format!("{:?}", b.ca).contains("PRIVATE KEY"),
            "keys are redacted"
        );
    }

    #[test]
    fn names_are_checked_before_anything_is_generated() {
        let ok = names(&["localhost"]);
        assert!(matches!(generate_pem(&[], &[]), Err(CertError::NoHubName)));
        assert!(matches!(
            generate_pem(&names(&["bad name"]), &[]),
            Err(CertError::InvalidHubName(_))
        ));
        // Gateway ids come as `GatewayId`s: what breaks the rule never gets here.
        for bad in ["gw/1", "_gw", ".gw", "-gw", ".."] {
            assert!(bad.parse::<GatewayId>().is_err(), "{bad}");
        }
        assert!(matches!(
            generate_pem(&ok, &ids(&["HUB"])),
            Err(CertError::ReservedGatewayId(_))
        ));
        assert!(matches!(
            generate_pem(&ok, &ids(&["gw1", "GW1"])),
            Err(CertError::DuplicateGatewayId(_))
        ));
        // A hub-only bundle is fine.
        assert!(generate_pem(&ok, &[]).unwrap().gateways.is_empty());
    }

    #[test]
    fn bundle_files_parse_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let bundle = generate_bundle(
            &out,
            &names(&["outpost-hub", "localhost", "127.0.0.1"]),
            &ids(&["gw-1", "gw-2"]),
        )
        .unwrap();
        assert_eq!(bundle.gateways[1].cert, out.join("gw-2.pem"));
        let mut certs = vec![&bundle.ca_cert, &bundle.hub_cert];
        let mut keys = vec![&bundle.ca_key, &bundle.hub_key];
        for g in &bundle.gateways {
            certs.push(&g.cert);
            keys.push(&g.key);
        }
        for c in certs {
            let parsed: Vec<_> = CertificateDer::pem_file_iter(c)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(parsed.len(), 1, "{}", c.display());
        }
        for k in keys {
            PrivateKeyDer::from_pem_file(k).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = fs::metadata(k).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", k.display());
            }
        }
        // The files are a consistent set: the gateway certificate chains to the CA.
        let ca = CertificateDer::from_pem_file(&bundle.ca_cert).unwrap();
        let gw = CertificateDer::from_pem_file(&bundle.gateways[0].cert).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).unwrap();
        let anchors = &roots.roots;
        let ee = webpki::EndEntityCert::try_from(&gw).unwrap();
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            anchors,
            &[],
            rustls::pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();

        // A second run into the same folder refuses and leaves the files alone.
        let before = fs::read(&bundle.ca_key).unwrap();
        let again = generate_bundle(&out, &names(&["localhost"]), &ids(&["gw-3"]));
        assert!(matches!(again, Err(CertError::Exists(p)) if p == bundle.ca_cert));
        assert_eq!(fs::read(&bundle.ca_key).unwrap(), before);
        assert!(!out.join("gw-3.pem").exists());
    }
}

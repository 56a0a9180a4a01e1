//! `dps certificate …`: CA certificates and their proof of possession, as
//! `az iot dps certificate` manages them (upload, generate a verification code, verify with a
//! certificate the CA signed for that code, list, show, delete).

use super::client::{seg, CliError, Service};
use super::output::{self, Kind, OutputOpts};
use super::{if_match, read};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub enum CertificateCmd {
    /// Upload a CA certificate (PEM or DER-in-base64).
    ///
    /// Example: dps certificate create --certificate-name factory-ca --path ca.pem
    Create {
        #[arg(long)]
        certificate_name: String,
        #[arg(long)]
        path: PathBuf,
        /// Mark it verified on upload, without a proof of possession (the operator vouches).
        #[arg(long)]
        verified: bool,
    },
    /// Replace a CA certificate's file (a verification made for the old one is dropped).
    Update {
        #[arg(long)]
        certificate_name: String,
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        etag: String,
        #[arg(long)]
        verified: bool,
    },
    Show {
        #[arg(long)]
        certificate_name: String,
    },
    List,
    Delete {
        #[arg(long)]
        certificate_name: String,
        #[arg(long)]
        etag: Option<String>,
    },
    /// A fresh verification code: have the CA sign a certificate whose subject CN is it, then
    /// `dps certificate verify`.
    GenerateVerificationCode {
        #[arg(long)]
        certificate_name: String,
        #[arg(long)]
        etag: Option<String>,
    },
    /// Prove possession of the CA's key with the certificate it signed for the code.
    ///
    /// Example: dps certificate verify --certificate-name factory-ca --path verification.pem
    Verify {
        #[arg(long)]
        certificate_name: String,
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        etag: Option<String>,
    },
}

pub fn certificate(s: &Service, cmd: CertificateCmd, o: &OutputOpts) -> Result<(), CliError> {
    let path = |name: &str| format!("/certificates/{}", seg(name));
    let upload = |file: &PathBuf, verified: bool| -> Result<Value, CliError> {
        let mut body = json!({ "certificate": read(file)? });
        if verified {
            body["isVerified"] = json!(true);
        }
        Ok(body)
    };
    let v = match cmd {
        CertificateCmd::Create { certificate_name, path: file, verified } => {
            s.call("PUT", &path(&certificate_name), Some(&upload(&file, verified)?), &[])?.0
        }
        CertificateCmd::Update { certificate_name, path: file, etag, verified } => {
            s.call("PUT", &path(&certificate_name), Some(&upload(&file, verified)?), &[("If-Match", etag.as_str())])?.0
        }
        CertificateCmd::Show { certificate_name } => s.call("GET", &path(&certificate_name), None, &[])?.0,
        CertificateCmd::List => s.call("GET", "/certificates", None, &[])?.0.get("value").cloned().unwrap_or(Value::Array(Vec::new())),
        CertificateCmd::Delete { certificate_name, etag } => {
            s.call("DELETE", &path(&certificate_name), None, &if_match(&etag))?;
            return Ok(());
        }
        CertificateCmd::GenerateVerificationCode { certificate_name, etag } => {
            s.call("POST", &format!("{}/generateVerificationCode", path(&certificate_name)), None, &if_match(&etag))?.0
        }
        CertificateCmd::Verify { certificate_name, path: file, etag } => {
            let body = json!({ "certificate": read(&file)? });
            s.call("POST", &format!("{}/verify", path(&certificate_name)), Some(&body), &if_match(&etag))?.0
        }
    };
    output::print(v, Kind::Certificate, o);
    Ok(())
}

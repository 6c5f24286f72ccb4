//! `wsrelay healthcheck [URL]`: asks a node's `/readyz` and reports through the exit
//! status, so minimal container images need no curl.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Why the check failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    /// The URL is not `http://host[:port][/path]`.
    #[error("unsupported URL {0:?}: expected http://host[:port][/path]")]
    Url(String),
    /// Connecting, sending or reading failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The node answered, but not 200.
    #[error("not ready: {0}")]
    NotReady(String),
}

const TIMEOUT: Duration = Duration::from_secs(3);

/// The readiness URL of the node listening on `listen` (a wildcard address is
/// reached on loopback).
pub fn default_url(listen: SocketAddr) -> String {
    let host = match listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        ip if ip.is_ipv6() => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("http://{host}:{}/readyz", listen.port())
}

/// GETs `url`; `Ok` only for HTTP 200.
pub fn check(url: &str) -> Result<(), HealthcheckError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| HealthcheckError::Url(url.to_owned()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/readyz"),
    };
    let target = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr = target
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| HealthcheckError::Url(url.to_owned()))?;
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.take(64 * 1024).read_to_string(&mut response)?;
    let status = response.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim())
            .unwrap_or_default();
        Err(HealthcheckError::NotReady(
            format!("{status} {body}").trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_urls() {
        assert_eq!(
            default_url("0.0.0.0:8080".parse().unwrap()),
            "http://127.0.0.1:8080/readyz"
        );
        assert_eq!(
            default_url("10.1.2.3:9000".parse().unwrap()),
            "http://10.1.2.3:9000/readyz"
        );
        assert_eq!(
            default_url("[::]:8080".parse().unwrap()),
            "http://[::1]:8080/readyz"
        );
    }

    #[test]
    fn bad_urls_and_closed_ports_fail() {
        assert!(matches!(
            check("https://x/readyz"),
            Err(HealthcheckError::Url(_))
        ));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(check(&format!("http://127.0.0.1:{port}/readyz")).is_err());
    }
}

//! Scraping wsgate's `/metrics` once per second while it runs, as Prometheus does in
//! production: the cost of rendering the metrics is part of what the benchmark
//! measures. A plain HTTP/1.1 GET on loopback, with `Connection: close`, bounded in
//! time and size, reading the whole response.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Time between the starts of two scrapes (Prometheus' usual interval is 15–60 s; once
/// a second is a heavy scraper).
const INTERVAL: Duration = Duration::from_secs(1);
/// Bound on one scrape, connect to the last byte.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on a response (wsgate's is ~66 KB).
const MAX_RESPONSE: usize = 4 << 20;

/// How the scrapes of one run went.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scrapes {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

/// A thread scraping `/metrics` until [`Scraper::stop`].
pub struct Scraper {
    stop: Sender<()>,
    thread: JoinHandle<Scrapes>,
}

impl Scraper {
    /// Scrapes `admin` now, then every [`INTERVAL`].
    pub fn start(admin: SocketAddr) -> Scraper {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let mut scrapes = Scrapes::default();
            let mut next = Instant::now();
            loop {
                match get_metrics(admin) {
                    Ok(()) => scrapes.ok += 1,
                    Err(e) => {
                        scrapes.failed += 1;
                        scrapes.first_error.get_or_insert(e);
                    }
                }
                next += INTERVAL;
                let wait = next.saturating_duration_since(Instant::now());
                match stopped.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return scrapes,
                }
            }
        });
        Scraper { stop, thread }
    }

    /// Stops the thread (waiting for a scrape under way) and says how the scrapes went.
    pub fn stop(self) -> Scrapes {
        let _ = self.stop.send(());
        self.thread.join().unwrap_or_else(|_| Scrapes {
            failed: 1,
            first_error: Some("the scraper thread panicked".to_string()),
            ..Scrapes::default()
        })
    }
}

/// One `GET /metrics`: the whole response must arrive within [`TIMEOUT`], with status
/// 200, the body its `Content-Length` announces, and wsgate's metrics in it.
fn get_metrics(admin: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut stream =
        TcpStream::connect_timeout(&admin, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no complete response within {TIMEOUT:?}"));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) if response.len() + n > MAX_RESPONSE => {
                return Err(format!("response above {MAX_RESPONSE} bytes"));
            }
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    check_response(&response)
}

/// Checks a whole HTTP/1.1 response to `GET /metrics` (read until the server closed).
fn check_response(response: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(format!(
            "incomplete response header ({} bytes)",
            response.len()
        ));
    };
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err(format!("status {status:?}"));
    }
    let length = head.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    if let Some(length) = length
        && length != body.len()
    {
        return Err(format!(
            "body of {} bytes, Content-Length {length}",
            body.len()
        ));
    }
    if !body.contains("wsgate_") {
        return Err("no wsgate_ metric in the body".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn responses_are_checked_whole() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 14\r\n\r\nwsgate_x 1\n# e";
        assert_eq!(check_response(ok), Ok(()));
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nwsgate_x 1\n";
        assert!(
            check_response(short)
                .unwrap_err()
                .contains("Content-Length 99")
        );
        let refused = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        assert!(check_response(refused).unwrap_err().contains("404"));
        assert!(check_response(b"HTTP/1.1 200 OK\r\n").is_err());
        let other = b"HTTP/1.1 200 OK\r\n\r\nnginx_x 1\n";
        assert!(check_response(other).is_err());
    }

    #[test]
    fn a_scrape_reads_the_whole_response() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let n = conn.read(&mut request).unwrap();
            let body = "wsgate_x 1\n".repeat(10_000);
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            conn.write_all(head.as_bytes()).unwrap();
            conn.write_all(body.as_bytes()).unwrap();
            String::from_utf8_lossy(&request[..n]).into_owned()
        });
        assert_eq!(get_metrics(addr), Ok(()));
        let request = server.join().unwrap();
        assert!(
            request.starts_with("GET /metrics HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Connection: close\r\n"), "{request}");
    }

    #[test]
    fn a_scraper_counts_what_it_could_not_scrape() {
        // A port bound by a socket that never listens, held for the whole test: a
        // connect is refused, and no other test's listener can be given the port.
        let nowhere = tokio::net::TcpSocket::new_v4().unwrap();
        nowhere.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = nowhere.local_addr().unwrap();
        // The first scrape is made before the thread looks for the stop: one, failed.
        let scraper = Scraper::start(addr);
        let scrapes = scraper.stop();
        assert_eq!(scrapes.ok, 0);
        assert_eq!(scrapes.failed, 1, "{scrapes:?}");
        assert!(scrapes.first_error.unwrap().starts_with("connect"));
    }
}

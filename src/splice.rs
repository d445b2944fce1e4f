//! Zero-copy forwarding of large frame payloads between two plain TCP sockets.
//!
//! A pump copies every byte it forwards twice: from the source socket into its buffer,
//! then from the buffer to the destination socket. The payload of a data frame needs no
//! look at all once its header is scanned, so for a large one Linux's `splice(2)` moves
//! it instead: source socket → pipe → destination socket, passing references to the
//! kernel's pages rather than copying bytes through wsgate (HAProxy's `splice-auto` does
//! the same for byte tunnels). [`crate::pump`] uses it only when both sides are plain TCP
//! (TLS has to decrypt), only for the part of a payload not read yet, and only with a
//! pipe from this thread's small pool: each pipe costs two file descriptors, which are
//! what bounds the number of connections, so when none is free the pump copies as
//! before.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::OwnedFd;
use std::task::{Context, Poll, ready};

use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Payload bytes still to come below which a frame is not worth a splice: two system
/// calls more than a copy through the pump's buffer.
pub const MIN_PAYLOAD: u64 = 16 * 1024;

/// Bytes moved into a pipe at once: a pipe holds 16 pages by default.
pub const CHUNK: usize = 64 * 1024;

/// Pipes one worker thread holds at most, in use and spare (enough for the large frames
/// of 16 busy directions at once; the rest copy).
const MAX_PIPES: usize = 16;

/// File descriptors a worker's pipes may take: set aside from the open-file limit.
pub const MAX_DESCRIPTORS: usize = 2 * MAX_PIPES;

/// Spare pipes kept per thread for the next large frame.
const KEEP: usize = 4;

/// A pipe and the bytes it holds.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes spliced in and not yet out.
    held: usize,
}

thread_local! {
    static SPARE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    /// Pipes of this thread that exist (in use or spare).
    static ALIVE: Cell<usize> = const { Cell::new(0) };
}

impl Pipe {
    /// A pipe from this thread's pool, or a new one; `None` when the thread holds
    /// [`MAX_PIPES`] already or the system has no descriptor left.
    pub fn take() -> Option<Pipe> {
        if let Some(pipe) = SPARE.with_borrow_mut(Vec::pop) {
            return Some(pipe);
        }
        if ALIVE.get() >= MAX_PIPES {
            return None;
        }
        let (read, write) =
            rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).ok()?;
        ALIVE.set(ALIVE.get() + 1);
        Some(Pipe {
            read,
            write,
            held: 0,
        })
    }

    /// Gives an empty pipe back to this thread's pool (a pipe still holding bytes is
    /// closed: they belong to a connection that ended).
    pub fn give(self) {
        if self.held > 0 {
            return;
        }
        // `try_with`: a pump dropped while this thread's locals are destroyed closes it.
        let _ = SPARE.try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < KEEP {
                spare.push(self);
            }
        });
    }

    /// Bytes in the pipe.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Moves up to `max` bytes from `src` into the pipe, which must be empty (so that
    /// "try again" can only mean the socket has nothing to read). `Ok(0)` is the end of
    /// the stream.
    pub fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        debug_assert_eq!(self.held, 0, "filling a pipe that holds bytes");
        let max = max.min(CHUNK);
        loop {
            ready!(src.poll_read_ready(cx))?;
            let moved = src.try_io(Interest::READABLE, || {
                rustix::pipe::splice(src, None, &self.write, None, max, flags())
                    .map_err(io::Error::from)
            });
            match moved {
                Ok(n) => {
                    self.held = n;
                    return Poll::Ready(Ok(n));
                }
                // The socket was empty after all: readiness is cleared, wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Moves bytes from the pipe to `dst`; returns how many went. A peer that is gone
    /// gives EPIPE here, as for a write: splice has no MSG_NOSIGNAL, so this relies on
    /// SIGPIPE being ignored, which Rust's runtime does before `main`.
    pub fn poll_drain(&mut self, cx: &mut Context<'_>, dst: &TcpStream) -> Poll<io::Result<usize>> {
        loop {
            ready!(dst.poll_write_ready(cx))?;
            let moved = dst.try_io(Interest::WRITABLE, || {
                rustix::pipe::splice(&self.read, None, dst, None, self.held, flags())
                    .map_err(io::Error::from)
            });
            match moved {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.held -= n;
                    return Poll::Ready(Ok(n));
                }
                // The socket's send buffer is full: wait until it drains.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let _ = ALIVE.try_with(|alive| alive.set(alive.get().saturating_sub(1)));
    }
}

/// Pipes this thread holds, in use or spare (for tests).
#[cfg(test)]
pub fn alive() -> usize {
    ALIVE.get()
}

/// Never block on the pipe; move pages rather than copy them where the kernel can.
fn flags() -> SpliceFlags {
    SpliceFlags::NONBLOCK | SpliceFlags::MOVE
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    #[tokio::test]
    async fn bytes_move_from_socket_to_socket_unchanged_and_end_of_stream_shows() {
        let limit = std::time::Duration::from_secs(10);
        let (mut sender, src) = pair().await;
        let (dst, mut receiver) = pair().await;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                sender.write_all(&data).await.unwrap();
                sender.shutdown().await.unwrap();
            })
        };
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            receiver.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut pipe = Pipe::take().unwrap();
        let mut moved = 0;
        let relay = async {
            loop {
                let n = poll_fn(|cx| pipe.poll_fill(cx, &src, CHUNK)).await.unwrap();
                if n == 0 {
                    break;
                }
                moved += n;
                while pipe.held() > 0 {
                    poll_fn(|cx| pipe.poll_drain(cx, &dst)).await.unwrap();
                }
            }
        };
        tokio::time::timeout(limit, relay).await.unwrap();
        drop(dst);
        assert_eq!(moved, data.len());
        assert_eq!(
            tokio::time::timeout(limit, reader).await.unwrap().unwrap(),
            data
        );
        writer.await.unwrap();
        pipe.give();
    }

    #[test]
    fn pipes_are_reused_and_bounded_per_thread() {
        let first = Pipe::take().unwrap();
        first.give();
        let alive = ALIVE.get();
        let again = Pipe::take().unwrap();
        assert_eq!(ALIVE.get(), alive, "the spare pipe was reused");
        let mut held: Vec<Pipe> = std::iter::from_fn(Pipe::take).take(MAX_PIPES + 5).collect();
        held.push(again);
        assert_eq!(held.len(), MAX_PIPES);
        assert_eq!(ALIVE.get(), MAX_PIPES);
        drop(held);
        assert_eq!(ALIVE.get(), 0);
    }
}

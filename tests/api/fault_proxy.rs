//! A TCP proxy in front of a real server, for outage tests: `cut` closes every
//! connection and refuses new ones (to its clients the server is down; the
//! server itself, shared with other tests, is untouched), `restore` listens on
//! the same port again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub struct FaultProxy {
    pub port: u16,
    up: watch::Sender<bool>,
    listening: Arc<AtomicBool>,
}

impl FaultProxy {
    /// Proxies a free loopback port to `target` ("host:port"), on a thread of its own.
    pub fn start(target: &str) -> FaultProxy {
        let target: SocketAddr = target.parse().expect("target host:port");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let (up, mut wanted) = watch::channel(true);
        let listening = Arc::new(AtomicBool::new(false));
        let flag = listening.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                loop {
                    if !*wanted.borrow_and_update() {
                        if wanted.changed().await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let listener = loop {
                        match TcpListener::bind(("127.0.0.1", port)).await {
                            Ok(l) => break l,
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    };
                    flag.store(true, Ordering::SeqCst);
                    let mut conns = JoinSet::new();
                    loop {
                        tokio::select! {
                            accepted = listener.accept() => {
                                if let Ok((mut inbound, _)) = accepted {
                                    conns.spawn(async move {
                                        if let Ok(mut upstream) = TcpStream::connect(target).await {
                                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await;
                                        }
                                    });
                                }
                            }
                            changed = wanted.changed() => {
                                if changed.is_err() || !*wanted.borrow() {
                                    break;
                                }
                            }
                            Some(_) = conns.join_next(), if !conns.is_empty() => {}
                        }
                    }
                    drop(listener);
                    conns.shutdown().await; // every connection closed
                    flag.store(false, Ordering::SeqCst);
                }
            });
        });
        let proxy = FaultProxy { port, up, listening };
        proxy.wait_listening(true);
        proxy
    }

    fn wait_listening(&self, want: bool) {
        for _ in 0..500 {
            if self.listening.load(Ordering::SeqCst) == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "proxy on {} did not turn {}",
            self.port,
            if want { "up" } else { "down" }
        );
    }

    /// The server goes away: open connections are closed, new ones refused.
    pub fn cut(&self) {
        let _ = self.up.send(false);
        self.wait_listening(false);
    }

    /// The server is back on the same address.
    pub fn restore(&self) {
        let _ = self.up.send(true);
        self.wait_listening(true);
    }
}

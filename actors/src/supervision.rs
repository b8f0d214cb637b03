//! Supervision of the long-lived children: the model worker threads, and the
//! actix actors of one instance (the billing ledger, the retrieval actor).
//!
//! Restart policy: the first restart in a window is immediate, then each one
//! waits twice as long as the previous, up to a ceiling, so a child that crashes
//! on every start cannot spin the machine. Restarts are counted in metrics
//! (`supervisor_restarts_total{child}`) and a storm is logged as such.
//!
//! Mailboxes: messages sent through [`SendTracked`] (or a [`Supervised`]
//! handle) are counted per actor kind: depth (waiting or being handled), messages
//! handled, time waited in the mailbox and time the handler took
//! (`actor_mailbox_wait_seconds`, `actor_message_handling_seconds`; for a
//! handler that answers with a future, its synchronous part).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Once, RwLock, Weak};
use std::time::{Duration, Instant};

use actix::dev::{Request, SendError, ToEnvelope};
use actix::prelude::*;

/// The last failure of a supervised child, with its time (for /admin/actors).
#[derive(Debug, Default)]
pub struct LastError(std::sync::Mutex<Option<String>>);

impl LastError {
    pub fn note(&self, what: String) {
        let line = format!("{}: {what}", chrono::Utc::now().to_rfc3339());
        match self.0.lock() {
            Ok(mut g) => *g = Some(line),
            Err(p) => *p.into_inner() = Some(line),
        }
    }

    pub fn get(&self) -> Option<String> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestartPolicy {
    /// Restarts older than this are forgotten.
    pub window: Duration,
    /// The wait before the second restart within the window (doubling after).
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
    /// This many restarts within the window is a storm (logged as an error).
    pub storm: usize,
    recent: VecDeque<Instant>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy::new(
            Duration::from_secs(60),
            Duration::from_millis(250),
            Duration::from_secs(30),
            3,
        )
    }
}

impl RestartPolicy {
    pub fn new(window: Duration, base: Duration, max: Duration, storm: usize) -> Self {
        RestartPolicy {
            window,
            base,
            max,
            storm,
            recent: VecDeque::new(),
        }
    }

    /// Records a restart at `now`; returns how long to wait before it and the
    /// number of restarts within the window (this one included).
    pub fn restart(&mut self, now: Instant) -> (Duration, usize) {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
        let n = self.recent.len();
        let delay = if n <= 1 {
            Duration::ZERO
        } else {
            let factor = 1u32.checked_shl((n - 2).min(16) as u32).unwrap_or(u32::MAX);
            self.base.saturating_mul(factor).min(self.max)
        };
        (delay, n)
    }

    /// Records a restart of `child`, logs and counts it, and sleeps the backoff
    /// (for children on threads of their own).
    pub fn restart_blocking(&mut self, child: &'static str) {
        let delay = self.note_restart(child);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }

    /// Records a restart of `child`, logs and counts it; returns the backoff.
    pub fn note_restart(&mut self, child: &'static str) -> Duration {
        let (delay, n) = self.restart(Instant::now());
        metrics::counter!("supervisor_restarts_total", "child" => child).increment(1);
        if n >= self.storm {
            tracing::error!(
                child,
                restarts_in_window = n,
                backoff_ms = delay.as_millis() as u64,
                "restart storm"
            );
        } else {
            tracing::warn!(child, restarts_in_window = n, "restarting");
        }
        delay
    }
}

/// Runs `attempt` until it succeeds: at once, then after waits of 1 s doubling
/// to 30 s, logging each failure as `what` (a store to reconnect, an index to
/// catch up).
pub async fn retry_until_ok<T, E, Fut>(what: &'static str, mut attempt: impl FnMut() -> Fut) -> T
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut wait = Duration::from_secs(1);
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(what, error = %e, retry_in_ms = wait.as_millis() as u64, "still failing");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Keeps the message of the latest panic on each thread, for the supervisor
/// of an actor that dies of it (the default hook still prints it). Idempotent.
pub fn capture_panic_messages() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = info.payload().downcast_ref::<String>() {
                s.clone()
            } else {
                "panic".to_string()
            };
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("panicked: {msg}{at}")));
            previous(info);
        }));
    });
}

fn take_panic_message() -> Option<String> {
    LAST_PANIC.with(|p| p.borrow_mut().take())
}

/// Mailbox accounting of one actor kind (all its instances together).
#[derive(Debug)]
pub struct Mailbox {
    pub kind: &'static str,
    depth: AtomicI64,
    handled: AtomicU64,
}

impl Mailbox {
    pub const fn new(kind: &'static str) -> Self {
        Mailbox {
            kind,
            depth: AtomicI64::new(0),
            handled: AtomicU64::new(0),
        }
    }

    /// Messages sent and not yet handled (or being handled) now.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed).max(0) as u64
    }

    /// Messages handled since the process started.
    pub fn handled(&self) -> u64 {
        self.handled.load(Ordering::Relaxed)
    }
}

/// An actor whose mailbox is accounted (see [`tracked_mailbox!`]).
pub trait TrackedActor: Actor {
    fn mailbox() -> &'static Mailbox;
}

/// A message on its way through an accounted mailbox.
pub struct Tracked<M> {
    msg: M,
    ticket: Ticket,
}

struct Ticket {
    mailbox: &'static Mailbox,
    sent: Instant,
    open: bool,
}

impl Ticket {
    fn close(&mut self) {
        if std::mem::replace(&mut self.open, false) {
            self.mailbox.depth.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.close();
    }
}

impl<M: Message> Message for Tracked<M> {
    type Result = M::Result;
}

impl<M> Tracked<M> {
    pub fn new(msg: M, mailbox: &'static Mailbox) -> Self {
        mailbox.depth.fetch_add(1, Ordering::Relaxed);
        Tracked {
            msg,
            ticket: Ticket {
                mailbox,
                sent: Instant::now(),
                open: true,
            },
        }
    }

    /// The message back (not sent after all).
    pub fn into_inner(self) -> M {
        self.msg
    }

    /// Runs `handle` on the message, accounting the wait and the handling.
    pub fn handle_with<R>(self, handle: impl FnOnce(M) -> R) -> R {
        let Tracked { msg, mut ticket } = self;
        let kind = ticket.mailbox.kind;
        let started = Instant::now();
        metrics::histogram!("actor_mailbox_wait_seconds", "actor" => kind)
            .record(started.saturating_duration_since(ticket.sent).as_secs_f64());
        let r = handle(msg);
        ticket.mailbox.handled.fetch_add(1, Ordering::Relaxed);
        ticket.close();
        metrics::histogram!("actor_message_handling_seconds", "actor" => kind).record(started.elapsed().as_secs_f64());
        r
    }
}

/// Makes an actor's mailbox accounted under `$mailbox` (a `static Mailbox`):
/// it handles `Tracked<M>` for each listed message `M` it handles.
#[macro_export]
macro_rules! tracked_mailbox {
    ($actor:ty, $mailbox:expr; $($msg:ty),+ $(,)?) => {
        impl $crate::supervision::TrackedActor for $actor {
            fn mailbox() -> &'static $crate::supervision::Mailbox {
                &$mailbox
            }
        }
        $(
        impl ::actix::Handler<$crate::supervision::Tracked<$msg>> for $actor {
            type Result = <$actor as ::actix::Handler<$msg>>::Result;

            fn handle(&mut self, msg: $crate::supervision::Tracked<$msg>, ctx: &mut Self::Context) -> Self::Result {
                msg.handle_with(|m| <$actor as ::actix::Handler<$msg>>::handle(self, m, ctx))
            }
        }
        )+
    };
}

/// Sending through an accounted mailbox.
pub trait SendTracked<A: TrackedActor> {
    fn send_tracked<M>(&self, msg: M) -> Request<A, Tracked<M>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Tracked<M>>,
        A::Context: ToEnvelope<A, Tracked<M>>;

    fn do_send_tracked<M>(&self, msg: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Tracked<M>>,
        A::Context: ToEnvelope<A, Tracked<M>>;

    /// As `Addr::try_send`; a refused message comes back as it was.
    fn try_send_tracked<M>(&self, msg: M) -> Result<(), SendError<M>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Tracked<M>>,
        A::Context: ToEnvelope<A, Tracked<M>>;
}

impl<A: TrackedActor> SendTracked<A> for Addr<A> {
    fn send_tracked<M>(&self, msg: M) -> Request<A, Tracked<M>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Tracked<M>>,
        A::Context: ToEnvelope<A, Tracked<M>>,
    {
        self.send(Tracked::new(msg, A::mailbox()))
    }

    fn do_send_tracked<M>(&self, msg: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Tracked<M>>,
        A::Context: ToEnvelope<A, Tracked<M>>,
    {
        self.do_send(Tracked::new(msg, A::mailbox()))
    }

    fn try_send_tracked<M>(&self, msg: M) -> Result<(), SendError<M>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Tracked<M>>,
        A::Context: ToEnvelope<A, Tracked<M>>,
    {
        self.try_send(Tracked::new(msg, A::mailbox())).map_err(|e| match e {
            SendError::Full(m) => SendError::Full(m.into_inner()),
            SendError::Closed(m) => SendError::Closed(m.into_inner()),
        })
    }
}

/// What a supervised actor knows of its supervisor: it reports its exit.
#[derive(Debug)]
pub struct Child {
    pub name: &'static str,
    restarts: AtomicU64,
    /// Being restarted (between its exit and the new instance).
    restarting: AtomicBool,
    pub last_error: LastError,
    exited: tokio::sync::Notify,
}

impl Child {
    fn new(name: &'static str) -> Self {
        Child {
            name,
            restarts: AtomicU64::new(0),
            restarting: AtomicBool::new(false),
            last_error: LastError::default(),
            exited: tokio::sync::Notify::new(),
        }
    }

    /// Called from the actor's `stopped`: a panic is recorded as the last error.
    pub fn exited(&self) {
        if std::thread::panicking() {
            let why = take_panic_message().unwrap_or_else(|| "panicked".into());
            tracing::error!(child = self.name, error = %why, "supervised actor died");
            self.last_error.note(why);
        } else {
            // Also at every shutdown: not a warning.
            tracing::info!(child = self.name, "supervised actor stopped");
        }
        self.exited.notify_one();
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> &'static str {
        if self.restarting.load(Ordering::Relaxed) {
            "restarting"
        } else {
            "running"
        }
    }
}

type Factory<A> = Box<dyn Fn(Arc<Child>) -> Result<Addr<A>, String> + Send + Sync>;
type OnRestart<A> = Box<dyn Fn(&Addr<A>) + Send + Sync>;

/// An actor under a supervisor: callers always reach the current instance.
/// When the instance stops or dies (its `stopped` calls [`Child::exited`], and
/// a watchdog also notices a closed mailbox), a new one is made by the factory
/// after the policy's backoff, and `on_restart` runs with its address.
pub struct Supervised<A: Actor> {
    child: Arc<Child>,
    addr: RwLock<Addr<A>>,
    factory: Factory<A>,
    on_restart: Option<OnRestart<A>>,
}

impl<A: Actor> Supervised<A> {
    /// Makes the first instance and starts the watchdog (on the current
    /// actix arbiter). A factory failure here is returned.
    pub fn start(
        name: &'static str,
        policy: RestartPolicy,
        factory: impl Fn(Arc<Child>) -> Result<Addr<A>, String> + Send + Sync + 'static,
        on_restart: Option<OnRestart<A>>,
    ) -> Result<Arc<Self>, String> {
        capture_panic_messages();
        let child = Arc::new(Child::new(name));
        let first = factory(child.clone())?;
        let me = Arc::new(Supervised {
            child,
            addr: RwLock::new(first),
            factory: Box::new(factory),
            on_restart,
        });
        actix::spawn(watch(Arc::downgrade(&me), policy));
        Ok(me)
    }

    /// The current instance.
    pub fn addr(&self) -> Addr<A> {
        match self.addr.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn child(&self) -> &Child {
        &self.child
    }
}

impl<A: TrackedActor> Supervised<A> {
    pub fn send<M>(&self, msg: M) -> Request<A, Tracked<M>>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Tracked<M>>,
        A::Context: ToEnvelope<A, Tracked<M>>,
    {
        self.addr().send_tracked(msg)
    }

    pub fn do_send<M>(&self, msg: M)
    where
        M: Message + Send + 'static,
        M::Result: Send,
        A: Handler<Tracked<M>>,
        A::Context: ToEnvelope<A, Tracked<M>>,
    {
        self.addr().do_send_tracked(msg)
    }
}

async fn watch<A: Actor>(me: Weak<Supervised<A>>, mut policy: RestartPolicy) {
    let child = match me.upgrade() {
        Some(m) => m.child.clone(),
        None => return,
    };
    loop {
        tokio::select! {
            _ = child.exited.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let Some(sup) = me.upgrade() else { return };
        if sup.addr().connected() {
            continue;
        }
        child.restarting.store(true, Ordering::Relaxed);
        let delay = policy.note_restart(child.name);
        drop(sup);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let Some(sup) = me.upgrade() else { return };
        match (sup.factory)(child.clone()) {
            Ok(addr) => {
                child.restarts.fetch_add(1, Ordering::Relaxed);
                match sup.addr.write() {
                    Ok(mut g) => *g = addr.clone(),
                    Err(p) => *p.into_inner() = addr.clone(),
                }
                child.restarting.store(false, Ordering::Relaxed);
                if let Some(hook) = &sup.on_restart {
                    hook(&addr);
                }
                tracing::info!(child = child.name, "supervised actor restarted");
            }
            Err(e) => {
                tracing::error!(child = child.name, error = %e, "supervised actor could not be restarted");
                child.last_error.note(format!("restart failed: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fragile {
        child: Arc<Child>,
        n: u32,
    }

    impl Actor for Fragile {
        type Context = Context<Self>;

        fn stopped(&mut self, _: &mut Self::Context) {
            self.child.exited();
        }
    }

    #[derive(Message)]
    #[rtype(result = "u32")]
    struct Bump;

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Boom;

    impl Handler<Bump> for Fragile {
        type Result = u32;
        fn handle(&mut self, _: Bump, _: &mut Self::Context) -> u32 {
            self.n += 1;
            self.n
        }
    }

    impl Handler<Boom> for Fragile {
        type Result = ();
        fn handle(&mut self, _: Boom, _: &mut Self::Context) {
            #[allow(clippy::panic)]
            {
                panic!("boom on request");
            }
        }
    }

    static FRAGILE: Mailbox = Mailbox::new("fragile");
    crate::tracked_mailbox!(Fragile, FRAGILE; Bump, Boom);

    async fn restarts_reach(sup: &Supervised<Fragile>, n: u64) {
        for _ in 0..200 {
            if sup.child().restarts() >= n && sup.addr().connected() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no restart {n}: {}", sup.child().restarts());
    }

    #[actix::test]
    async fn a_supervised_actor_that_dies_is_restarted_with_backoff_and_its_error_kept() {
        let hooked = Arc::new(AtomicU64::new(0));
        let h = hooked.clone();
        let arbiter = Arbiter::new().handle();
        let sup = Supervised::start(
            "fragile",
            RestartPolicy::new(
                Duration::from_secs(60),
                Duration::from_millis(300),
                Duration::from_secs(1),
                3,
            ),
            move |child| Ok(Fragile::start_in_arbiter(&arbiter, move |_| Fragile { child, n: 0 })),
            Some(Box::new(move |_| {
                h.fetch_add(1, Ordering::Relaxed);
            })),
        )
        .expect("start");
        assert_eq!(sup.send(Bump).await.expect("alive"), 1);
        assert_eq!(sup.send(Bump).await.expect("alive"), 2);
        assert_eq!((FRAGILE.handled(), FRAGILE.depth()), (2, 0));
        assert_eq!(sup.child().state(), "running");

        sup.do_send(Boom);
        restarts_reach(&sup, 1).await;
        let err = sup.child().last_error.get().expect("last error kept");
        assert!(err.contains("boom on request"), "{err}");
        assert_eq!(hooked.load(Ordering::Relaxed), 1, "the restart hook ran");
        // A fresh instance: its state starts over.
        assert_eq!(sup.send(Bump).await.expect("restarted"), 1);

        // The second restart within the window waits the backoff.
        let t = Instant::now();
        sup.do_send(Boom);
        restarts_reach(&sup, 2).await;
        assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
        assert_eq!(sup.send(Bump).await.expect("restarted"), 1);
        assert_eq!(FRAGILE.depth(), 0, "nothing left counted in the mailbox");
    }

    #[test]
    fn restarts_back_off_exponentially_up_to_the_ceiling_and_reset_after_the_window() {
        let mut p = RestartPolicy::new(
            Duration::from_secs(60),
            Duration::from_millis(100),
            Duration::from_secs(1),
            3,
        );
        let t0 = Instant::now();
        let delays: Vec<u128> = (0..7)
            .map(|i| p.restart(t0 + Duration::from_secs(i)).0.as_millis())
            .collect();
        assert_eq!(delays, [0, 100, 200, 400, 800, 1000, 1000]);
        // A quiet minute later the next restart is immediate again.
        let (d, n) = p.restart(t0 + Duration::from_secs(200));
        assert_eq!((d, n), (Duration::ZERO, 1));
    }
}

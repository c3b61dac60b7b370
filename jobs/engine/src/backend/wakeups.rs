//! One LISTEN connection per worker process, waking every queue's worker.
//!
//! Jobs that become due announce their queue on the `apalis::job::insert`
//! channel (the insert trigger, once per statement and queue; the runtime's
//! due-job wake-up; an operator's retry). apalis-postgres's `Pubsub` held a
//! listening connection per queue, each receiving every queue's
//! notifications: five per process for an app of five queues, and a batch
//! insert's notifications delivered five times. Here one listener reads
//! them and wakes the workers of the queue named.
//!
//! A job inserted for later (a delay, a unique window, a delayed workflow
//! step) is announced too, with how long until it is due (`due_in`, the
//! earliest of the statement's rows): the listener wakes its queue's workers
//! then, on a timer of its own, so a delayed job starts on time however long
//! the poll interval is.
//!
//! A wake-up is a hint: a worker also claims at its poll interval and when
//! a job finishes, so a notification lost while the listener reconnects (or
//! sent before this process started) costs at most one interval; after a
//! reconnect every worker is woken.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;

use serde::Deserialize;
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The channel apalis-postgres's insert trigger notified on, kept so that
/// every writer of wake-ups (ours, apalis's) reaches the workers.
const CHANNEL: &str = "apalis::job::insert";

/// How long the listener waits before connecting again after a failure.
const RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// The process's wake-ups: [`Wakeups::listen`] starts the listener,
/// [`Wakeups::subscribe`] gives a queue's worker its stream.
#[derive(Debug, Clone, Default)]
pub(crate) struct Wakeups {
    subscribers: Arc<Mutex<HashMap<String, Vec<mpsc::Sender<()>>>>>,
}

/// What a notification says: the queue with a due job, or with one due in
/// `due_in` seconds (any other field is ignored).
#[derive(Debug, Deserialize)]
struct Notification {
    job_type: String,
    #[serde(default)]
    due_in: Option<f64>,
}

/// Timed wake-ups further out than this are not kept.
const TIMED_WAKE_HORIZON_SECS: f64 = 86_400.0;

/// A timed wake-up comes this long after the job's due time, so that the
/// database's clock has passed it too when the worker claims (the claim
/// takes jobs with `run_at < now()`); a second one follows in case the first
/// still came early (the notification is sent at the insert, received after
/// the commit).
const TIMED_WAKE_LATE: [Duration; 2] = [Duration::from_millis(5), Duration::from_millis(150)];

impl Wakeups {
    /// Starts listening on a connection of `pool` until `stop` fires; the
    /// listener reconnects by itself after a lost connection.
    pub(crate) fn listen(pool: PgPool, stop: CancellationToken) -> Self {
        let wakeups = Self::default();
        let (listener, timers) = (wakeups.clone(), wakeups.clone());
        let (timer, timed) = mpsc::unbounded_channel();
        let timers_stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = timers.run_timers(timed) => {}
                () = timers_stop.cancelled() => {}
            }
        });
        tokio::spawn(async move {
            tokio::select! {
                () = listener.run(&pool, &timer) => {}
                () = stop.cancelled() => {}
            }
        });
        wakeups
    }

    /// Wakes each queue at the times sent on `timed` (the earliest first).
    async fn run_timers(&self, mut timed: mpsc::UnboundedReceiver<(Instant, String)>) {
        let mut due: BinaryHeap<Reverse<(Instant, String)>> = BinaryHeap::new();
        loop {
            let next = due.peek().map(|Reverse((at, _))| *at);
            tokio::select! {
                received = timed.recv() => match received {
                    Some(wake) => due.push(Reverse(wake)),
                    None => return,
                },
                () = async {
                    match next {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let now = Instant::now();
                    while due.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                        if let Some(Reverse((_, queue))) = due.pop() {
                            self.wake(Some(&queue));
                        }
                    }
                }
            }
        }
    }

    /// A stream that yields once for every burst of notifications for
    /// `queue` since it was last polled. It holds at most one wake-up, so a
    /// busy worker never has a backlog of them: apalis takes one item per
    /// poll of the worker, and a backlog kept the stream from registering
    /// its waker, so the next notification woke nobody (measured: a second
    /// burst of jobs waited for the next heartbeat).
    pub(crate) fn subscribe(&self, queue: &str) -> Wakeup {
        let (sender, receiver) = mpsc::channel(1);
        self.subscribers
            .lock()
            .expect("no panic while the map is locked")
            .entry(queue.to_owned())
            .or_default()
            .push(sender);
        Wakeup(receiver)
    }

    /// Wakes `queue`'s workers (every queue's with `None`), and forgets the
    /// streams of workers that are gone.
    fn wake(&self, queue: Option<&str>) {
        let mut subscribers = self
            .subscribers
            .lock()
            .expect("no panic while the map is locked");
        let wake = |senders: &mut Vec<mpsc::Sender<()>>| {
            senders.retain(|sender| {
                // Full: a wake-up is already waiting, which says the same.
                !matches!(
                    sender.try_send(()),
                    Err(mpsc::error::TrySendError::Closed(()))
                )
            });
        };
        match queue {
            Some(queue) => {
                if let Some(senders) = subscribers.get_mut(queue) {
                    wake(senders);
                }
            }
            None => subscribers.values_mut().for_each(wake),
        }
    }

    async fn run(&self, pool: &PgPool, timer: &mpsc::UnboundedSender<(Instant, String)>) {
        let mut failing = false;
        loop {
            let mut listener = match connect(pool).await {
                Ok(listener) => listener,
                Err(err) => {
                    if !failing {
                        tracing::warn!(error = %err, "cannot listen for new jobs; polling meanwhile, retrying");
                        failing = true;
                    }
                    tokio::time::sleep(RECONNECT_DELAY).await;
                    continue;
                }
            };
            if failing {
                tracing::info!("listening for new jobs again");
                failing = false;
            }
            // Whatever was announced while no one listened.
            self.wake(None);
            loop {
                match listener.try_recv().await {
                    Ok(Some(notification)) => {
                        match serde_json::from_str::<Notification>(notification.payload()) {
                            Ok(Notification {
                                job_type,
                                due_in: Some(due_in),
                            }) if due_in > 0.0 => {
                                // Further out than the horizon: the poll comes first.
                                if due_in <= TIMED_WAKE_HORIZON_SECS {
                                    let due = Instant::now() + Duration::from_secs_f64(due_in);
                                    for late in TIMED_WAKE_LATE {
                                        let _ = timer.send((due + late, job_type.clone()));
                                    }
                                }
                            }
                            Ok(notification) => self.wake(Some(&notification.job_type)),
                            // Not ours to read: wake everyone rather than miss a job.
                            Err(_) => self.wake(None),
                        }
                    }
                    // The connection was lost; the next call reconnects.
                    Ok(None) => self.wake(None),
                    Err(err) => {
                        tracing::warn!(error = %err, "lost the listener for new jobs; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// A queue's wake-ups (see [`Wakeups::subscribe`]).
#[derive(Debug)]
pub(crate) struct Wakeup(mpsc::Receiver<()>);

impl futures::Stream for Wakeup {
    type Item = ();

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.0.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures::{Stream as _, StreamExt as _};

    use super::*;

    #[tokio::test]
    async fn a_burst_is_one_wake_up_for_the_named_queue_only() {
        let wakeups = Wakeups::default();
        let mut trims = wakeups.subscribe("trims");
        let mut mails = wakeups.subscribe("mails");
        for _ in 0..5 {
            wakeups.wake(Some("trims"));
        }
        assert_eq!(trims.next().await, Some(()));
        let pending = |stream: &mut Wakeup| {
            let waker = futures::task::noop_waker();
            Pin::new(stream)
                .poll_next(&mut Context::from_waker(&waker))
                .is_pending()
        };
        assert!(pending(&mut trims), "five notifications, one wake-up");
        assert!(pending(&mut mails), "another queue's jobs wake nobody here");
        wakeups.wake(None);
        assert_eq!(mails.next().await, Some(()));
        drop(trims);
        wakeups.wake(Some("trims"));
        assert!(
            wakeups.subscribers.lock().expect("not poisoned")["trims"].is_empty(),
            "a dropped stream is forgotten"
        );
    }
}

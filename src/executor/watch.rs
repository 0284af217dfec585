//! The one polling loop of a run: every job the run submitted is read from the scheduler in a
//! single call per interval, the interval starting at `poll_interval`, growing by half while
//! no job changes state, up to `poll_max`, and starting over at any change. Stages block in
//! [`Watcher::wait`] until their job ends or the run is interrupted.
//!
//! Invariants: at most one scheduler call is in flight; a job is polled until it ends; after
//! an interrupt every job still pending or running is cancelled in one call, and
//! [`Watcher::shutdown`] waits (at most [`CANCEL_WAIT`]) until the scheduler reports them
//! ended, so a run that says "interrupted" leaves none behind; a job the scheduler stops
//! knowing is asked of its history (accounting) once, then taken as [`JobState::Vanished`].

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cusa_stages::api::Cancel;

use super::{Cluster, JobId, JobState, JobStatus};

/// How long an interrupted run waits for its cancelled jobs to leave the queue.
pub const CANCEL_WAIT: Duration = Duration::from_secs(60);

/// How a wait ended.
pub enum Waited {
    Ended(JobStatus),
    Interrupted,
}

struct Tracked {
    word: Option<String>,
    ended: Option<JobStatus>,
    /// Consecutive polls that did not list the job.
    missing: u32,
}

#[derive(Default)]
struct State {
    jobs: BTreeMap<JobId, Tracked>,
    stop: bool,
    cancelled: Vec<JobId>,
    /// Scheduler calls made (polls, history lookups, cancels).
    calls: u64,
}

struct Inner<C: Cluster> {
    cluster: C,
    cancel: Cancel,
    state: Mutex<State>,
    changed: Condvar,
    min: Duration,
    max: Duration,
    warn: Box<dyn Fn(&str) + Send + Sync>,
}

/// The run's poller (see the module doc).
pub struct Watcher<C: Cluster + 'static> {
    inner: Arc<Inner<C>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<C: Cluster + 'static> Watcher<C> {
    pub fn new(
        cluster: C,
        cancel: Cancel,
        (min, max): (Duration, Duration),
        warn: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Self {
        let inner = Arc::new(Inner {
            cluster,
            cancel,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            min,
            max: max.max(min),
            warn,
        });
        let looping = inner.clone();
        let thread = std::thread::spawn(move || poll_loop(&looping));
        Watcher {
            inner,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn cluster(&self) -> &C {
        &self.inner.cluster
    }

    /// Starts following a submitted job.
    pub fn track(&self, id: &JobId) {
        let mut st = self.inner.state.lock().expect("watch lock");
        st.jobs.insert(
            id.clone(),
            Tracked {
                word: None,
                ended: None,
                missing: 0,
            },
        );
        drop(st);
        self.inner.changed.notify_all();
    }

    /// Blocks until `id` ends or the run is interrupted.
    pub fn wait(&self, id: &JobId) -> Waited {
        let mut st = self.inner.state.lock().expect("watch lock");
        loop {
            if let Some(end) = st.jobs.get(id).and_then(|t| t.ended.clone()) {
                return Waited::Ended(end);
            }
            if self.inner.cancel.is_cancelled() {
                return Waited::Interrupted;
            }
            st = self
                .inner
                .changed
                .wait_timeout(st, Duration::from_millis(200))
                .expect("watch lock")
                .0;
        }
    }

    /// Stops polling. After an interrupt, first waits (at most [`CANCEL_WAIT`]) for the
    /// cancelled jobs to end. Returns the jobs cancelled and the scheduler calls made.
    pub fn shutdown(&self) -> (Vec<JobId>, u64) {
        let deadline = Instant::now() + CANCEL_WAIT;
        {
            let mut st = self.inner.state.lock().expect("watch lock");
            while self.inner.cancel.is_cancelled()
                && st.jobs.values().any(|t| t.ended.is_none())
                && Instant::now() < deadline
            {
                st = self
                    .inner
                    .changed
                    .wait_timeout(st, Duration::from_millis(200))
                    .expect("watch lock")
                    .0;
            }
            st.stop = true;
        }
        self.inner.changed.notify_all();
        if let Some(t) = self.thread.lock().expect("watch thread").take() {
            let _ = t.join();
        }
        let st = self.inner.state.lock().expect("watch lock");
        (st.cancelled.clone(), st.calls)
    }
}

fn poll_loop<C: Cluster>(inner: &Inner<C>) {
    let mut interval = inner.min;
    let mut last: Option<Instant> = None;
    let mut warned = false;
    loop {
        let mut st = inner.state.lock().expect("watch lock");
        if st.stop {
            return;
        }
        let active: Vec<JobId> = st
            .jobs
            .iter()
            .filter(|(_, t)| t.ended.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        if inner.cancel.is_cancelled() && st.cancelled.is_empty() && !active.is_empty() {
            st.cancelled = active.clone();
            st.calls += 1;
            drop(st);
            if let Err(e) = inner.cluster.cancel(&active) {
                (inner.warn)(&format!(
                    "warning: cancelling {} job(s) {}: {e}",
                    inner.cluster.name(),
                    active.join(",")
                ));
            }
            // Follow the cancellation closely, within the admins' lower bound.
            interval = inner.min.min(Duration::from_secs(1));
            last = None;
            continue;
        }
        // A new job is first polled after one full interval (sbatch already answered).
        let due = last.is_none_or(|l| l.elapsed() >= interval);
        if active.is_empty() || !due {
            let _ = inner
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .expect("watch lock");
            continue;
        }
        st.calls += 1;
        drop(st);
        let polled = inner.cluster.poll(&active);
        last = Some(Instant::now());
        let statuses = match polled {
            Ok(s) => {
                warned = false;
                s
            }
            Err(e) => {
                if !warned {
                    (inner.warn)(&format!(
                        "warning: asking {} about the run's jobs: {e} (trying again)",
                        inner.cluster.name()
                    ));
                    warned = true;
                }
                interval = (interval * 3 / 2).min(inner.max);
                continue;
            }
        };
        let mut st = inner.state.lock().expect("watch lock");
        let mut changed = false;
        let mut forgotten = Vec::new();
        for id in &active {
            let Some(t) = st.jobs.get_mut(id) else {
                continue;
            };
            match statuses.iter().find(|s| &s.id == id) {
                Some(s) => {
                    t.missing = 0;
                    if t.word.as_deref() != Some(s.word.as_str()) {
                        changed = true;
                        t.word = Some(s.word.clone());
                    }
                    if s.state.is_finished() {
                        t.ended = Some(s.clone());
                    }
                }
                None => {
                    t.missing += 1;
                    if t.missing >= 2 {
                        forgotten.push(id.clone());
                    }
                }
            }
        }
        if !forgotten.is_empty() {
            st.calls += 1;
            drop(st);
            let known = inner.cluster.history(&forgotten).unwrap_or_default();
            st = inner.state.lock().expect("watch lock");
            for id in &forgotten {
                let status = known
                    .iter()
                    .find(|s| &s.id == id && s.state.is_finished())
                    .cloned()
                    .unwrap_or_else(|| JobStatus {
                        id: id.clone(),
                        state: JobState::Vanished,
                        word: "UNKNOWN".into(),
                        node: None,
                        exit_code: None,
                        signal: None,
                        reason: Some(format!(
                            "{} no longer lists the job and keeps no accounting",
                            inner.cluster.name()
                        )),
                    });
                if let Some(t) = st.jobs.get_mut(id) {
                    t.ended = Some(status);
                }
            }
            changed = true;
        }
        drop(st);
        inner.changed.notify_all();
        if !inner.cancel.is_cancelled() {
            interval = if changed {
                inner.min
            } else {
                (interval * 3 / 2).min(inner.max)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::super::{ClusterError, JobSpec};
    use super::*;

    /// A scheduler whose jobs run for a fixed number of polls; counts its calls.
    struct Clock {
        polls: AtomicU64,
        batch: Mutex<Vec<usize>>,
        cancelled: Mutex<Vec<Vec<JobId>>>,
        runs_for: u64,
    }

    impl Cluster for Clock {
        type Settings = ();
        fn name(&self) -> &'static str {
            "clock"
        }
        fn submit(&self, _: &JobSpec, _: &()) -> Result<JobId, ClusterError> {
            unreachable!()
        }
        fn poll(&self, jobs: &[JobId]) -> Result<Vec<JobStatus>, ClusterError> {
            let n = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
            self.batch.lock().unwrap().push(jobs.len());
            let cancelled = !self.cancelled.lock().unwrap().is_empty();
            Ok(jobs
                .iter()
                .map(|id| {
                    let (state, word) = if cancelled {
                        (JobState::Cancelled, "CANCELLED")
                    } else if n >= self.runs_for {
                        (JobState::Completed, "COMPLETED")
                    } else {
                        (JobState::Running, "RUNNING")
                    };
                    JobStatus {
                        id: id.clone(),
                        state,
                        word: word.into(),
                        node: Some("n1".into()),
                        exit_code: Some(0),
                        signal: None,
                        reason: None,
                    }
                })
                .collect())
        }
        fn history(&self, _: &[JobId]) -> Option<Vec<JobStatus>> {
            None
        }
        fn cancel(&self, jobs: &[JobId]) -> Result<(), ClusterError> {
            self.cancelled.lock().unwrap().push(jobs.to_vec());
            Ok(())
        }
    }

    fn clock(runs_for: u64) -> Clock {
        Clock {
            polls: AtomicU64::new(0),
            batch: Mutex::new(Vec::new()),
            cancelled: Mutex::new(Vec::new()),
            runs_for,
        }
    }

    #[test]
    fn all_jobs_are_read_in_one_call_per_interval() {
        let interval = Duration::from_millis(20);
        let w = Watcher::new(
            clock(4),
            Cancel::new(),
            (interval, interval * 4),
            Box::new(|_| {}),
        );
        let ids: Vec<JobId> = (1..=5).map(|i| i.to_string()).collect();
        for id in &ids {
            w.track(id);
        }
        for id in &ids {
            assert!(matches!(w.wait(id), Waited::Ended(s) if s.state == JobState::Completed));
        }
        let (_, calls) = w.shutdown();
        let batches = w.cluster().batch.lock().unwrap().clone();
        assert_eq!(calls as usize, batches.len());
        // One call per interval for all five (the first may see fewer if tracking raced it).
        assert!(batches.len() <= 5, "{batches:?}");
        assert!(batches.contains(&5), "{batches:?}");
    }

    #[test]
    fn an_interrupt_cancels_every_job_in_one_call_and_waits_for_them() {
        let cancel = Cancel::new();
        let ms = Duration::from_millis(10);
        let w = Watcher::new(clock(u64::MAX), cancel.clone(), (ms, ms), Box::new(|_| {}));
        for id in ["7", "8", "9"] {
            w.track(&id.to_string());
        }
        std::thread::sleep(ms * 5);
        cancel.cancel(libc::SIGTERM);
        assert!(matches!(w.wait(&"7".to_string()), Waited::Interrupted));
        let (cancelled, _) = w.shutdown();
        assert_eq!(cancelled, ["7", "8", "9"]);
        assert_eq!(*w.cluster().cancelled.lock().unwrap(), vec![cancelled]);
    }
}

//! Job and GPU slots: the runner never runs more than `-j N` stages, nor hands out more GPUs
//! than `--gpus`. Waiters are served in pipeline order (lowest topological position first)
//! whenever their request fits, so scheduling is predictable; a stage that needs more GPUs than
//! exist is rejected before it waits (see `runner`). With `-j 1` the run is strictly
//! sequential in pipeline order: each stage, cached ones included, takes its [`Slots::turn`]
//! after every earlier stage is done, so output is deterministic.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};

pub struct Slots {
    state: Mutex<State>,
    freed: Condvar,
}

struct State {
    sequential: bool,
    /// Positions of stages that are done (for sequential turns).
    done: std::collections::BTreeSet<usize>,
    jobs: usize,
    gpus: Vec<usize>,
    /// priority → GPUs wanted, for every waiting stage.
    waiting: BTreeMap<usize, usize>,
}

/// Held slots; released on drop.
pub struct Grant<'a> {
    slots: &'a Slots,
    pub gpus: Vec<usize>,
}

impl Slots {
    pub fn new(jobs: usize, gpus: usize) -> Self {
        let state = State {
            sequential: jobs <= 1,
            done: Default::default(),
            jobs: jobs.max(1),
            gpus: (0..gpus).collect(),
            waiting: BTreeMap::new(),
        };
        Slots {
            state: Mutex::new(state),
            freed: Condvar::new(),
        }
    }

    /// In sequential mode, blocks until every stage before `position` is done; the returned
    /// guard marks this one done. In parallel mode returns at once.
    pub fn turn(&self, position: usize) -> Turn<'_> {
        let mut st = self.state.lock().expect("slots lock");
        while st.sequential && st.done.range(..position).count() < position {
            st = self.freed.wait(st).expect("slots lock");
        }
        Turn {
            slots: self,
            position,
        }
    }

    /// Blocks until one job slot and `gpus` GPUs are free and no earlier waiter that would
    /// fit is ahead. `priority` must be unique among concurrent callers.
    pub fn acquire(&self, priority: usize, gpus: usize) -> Grant<'_> {
        let mut st = self.state.lock().expect("slots lock");
        st.waiting.insert(priority, gpus);
        loop {
            let fits = |jobs: usize, free: usize, want: usize| jobs >= 1 && free >= want;
            let earlier_fits = st
                .waiting
                .range(..priority)
                .any(|(_, &want)| fits(st.jobs, st.gpus.len(), want));
            if fits(st.jobs, st.gpus.len(), gpus) && !earlier_fits {
                st.waiting.remove(&priority);
                st.jobs -= 1;
                let granted: Vec<usize> = st.gpus.drain(..gpus).collect();
                return Grant {
                    slots: self,
                    gpus: granted,
                };
            }
            st = self.freed.wait(st).expect("slots lock");
        }
    }
}

/// A stage's turn; marks it done when dropped.
pub struct Turn<'a> {
    slots: &'a Slots,
    position: usize,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.slots
            .state
            .lock()
            .expect("slots lock")
            .done
            .insert(self.position);
        self.slots.freed.notify_all();
    }
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        let mut st = self.slots.state.lock().expect("slots lock");
        st.jobs += 1;
        st.gpus.append(&mut self.gpus);
        st.gpus.sort_unstable();
        drop(st);
        self.slots.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn never_more_than_j_at_once() {
        let slots = Arc::new(Slots::new(2, 0));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (slots, running, peak) = (slots.clone(), running.clone(), peak.clone());
                std::thread::spawn(move || {
                    let _g = slots.acquire(i, 0);
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn one_job_means_pipeline_order() {
        let slots = Arc::new(Slots::new(1, 0));
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let handles: Vec<_> = (0..5)
            .rev()
            .map(|i| {
                let (slots, order) = (slots.clone(), order.clone());
                std::thread::spawn(move || {
                    let _t = slots.turn(i);
                    order.lock().unwrap().push(i);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn gpus_are_handed_out_and_returned() {
        let slots = Slots::new(4, 2);
        let a = slots.acquire(0, 1);
        let b = slots.acquire(1, 1);
        assert_eq!((a.gpus.clone(), b.gpus.clone()), (vec![0], vec![1]));
        drop(a);
        let c = slots.acquire(2, 1);
        assert_eq!(c.gpus, vec![0]);
    }
}

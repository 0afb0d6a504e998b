//! The sweep's jobs and leases: a plain state machine with no I/O, so that every rule
//! (leases expire, failures retry a bounded number of times, a job completes once) is tested
//! directly. The gRPC service drives it under one mutex.
//!
//! A job is Queued, Leased (to a worker, until a deadline that heartbeats extend), Done or
//! Failed (given up after `max_attempts` tries). Workers are not trusted: a completion counts
//! only from the worker holding the job's live lease (its id and lease id, before the
//! deadline); one for a job already Done is a harmless duplicate, and anything else is
//! refused. That, and the journal replay at start-up, is what makes every row appear exactly
//! once.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::time::{Duration, Instant};

/// What a job computes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// The `sK` noise level.
    Calibration,
    /// Layers `layers` of the fact at `fact` in the sweep's fact list.
    Trace {
        /// Index into the sweep's facts.
        fact: usize,
        /// The layers whose scores this job computes.
        layers: Range<u32>,
    },
}

/// A job: its deterministic id and its work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// `calibration` or `<known_id>:<lo>-<hi>`.
    pub id: String,
    /// What it computes.
    pub work: Work,
}

#[derive(Debug, Clone, PartialEq)]
enum Status {
    Queued,
    Leased { worker: String, lease_id: u64, deadline: Instant },
    Done,
    Failed,
}

#[derive(Debug)]
struct JobState {
    spec: JobSpec,
    status: Status,
    /// Failed tries so far (failures and expired leases; releases do not count).
    attempts: u32,
}

#[derive(Debug)]
struct WorkerState {
    name: String,
    last_seen: Instant,
    /// The job and lease id last leased to it.
    holding: Option<(usize, u64)>,
}

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The job.
    pub spec: JobSpec,
    /// Names this lease.
    pub lease_id: u64,
}

/// What became of a completion.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// From the holder of the job's live lease: keep the result.
    Accepted,
    /// The job is done already (a retried or duplicate hand-in): drop it, nothing is wrong.
    AlreadyDone,
    /// Not from the holder of a live lease (never leased to this worker, expired, or leased
    /// to another since, or an unknown job): refused.
    NotHeld,
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseOutcome {
    /// Compute this.
    Job(Lease),
    /// Nothing to hand out now; ask again later.
    Wait,
    /// Every job is done or given up.
    Finished,
}

/// A job given up on: it becomes an `errors` row.
#[derive(Debug, Clone, PartialEq)]
pub struct GivenUp {
    /// The job.
    pub spec: JobSpec,
    /// Where its last try failed.
    pub stage: String,
    /// Why, with the number of tries.
    pub message: String,
}

/// Counts for progress, status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Jobs in the sweep (done in earlier runs included).
    pub total: u64,
    /// Waiting for a worker.
    pub queued: u64,
    /// Being computed.
    pub leased: u64,
    /// Done (this run or earlier).
    pub done: u64,
    /// Given up.
    pub failed: u64,
    /// Tries that failed or expired and were queued again.
    pub retries: u64,
    /// Registered workers seen within the last lease period.
    pub workers: u64,
}

/// Jobs, leases and workers.
#[derive(Debug)]
pub struct Scheduler {
    jobs: Vec<JobState>,
    index: HashMap<String, usize>,
    queue: VecDeque<usize>,
    workers: HashMap<String, WorkerState>,
    next_lease: u64,
    next_worker: u64,
    lease_length: Duration,
    max_attempts: u32,
    /// While true only the calibration job is handed out: the others need its noise level.
    calibrating: bool,
    retries: u64,
}

impl Scheduler {
    /// An empty scheduler; leases last `lease_length` unless extended.
    pub fn new(lease_length: Duration, max_attempts: u32) -> Self {
        Self {
            jobs: Vec::new(),
            index: HashMap::new(),
            queue: VecDeque::new(),
            workers: HashMap::new(),
            next_lease: 1,
            next_worker: 1,
            lease_length,
            max_attempts: max_attempts.max(1),
            calibrating: false,
            retries: 0,
        }
    }

    /// Adds jobs; `done` ones (committed by an earlier run) are counted but never handed out.
    /// A calibration job that is not done holds back the others until it completes.
    pub fn add(&mut self, specs: impl IntoIterator<Item = JobSpec>, done: impl Fn(&str) -> bool) {
        for spec in specs {
            if self.index.contains_key(&spec.id) {
                continue;
            }
            let i = self.jobs.len();
            let is_done = done(&spec.id);
            if spec.work == Work::Calibration && !is_done {
                self.calibrating = true;
                self.queue.push_front(i);
            } else if !is_done {
                self.queue.push_back(i);
            }
            self.index.insert(spec.id.clone(), i);
            let status = if is_done { Status::Done } else { Status::Queued };
            self.jobs.push(JobState { spec, status, attempts: 0 });
        }
    }

    /// Marks jobs given up by an earlier run (added as done) as given up, so that counts
    /// after a resume match those of an uninterrupted run.
    pub fn mark_given_up(&mut self, ids: &std::collections::HashSet<String>) {
        for id in ids {
            if let Some(&i) = self.index.get(id)
                && self.jobs[i].status == Status::Done
            {
                self.jobs[i].status = Status::Failed;
            }
        }
    }

    /// Registers a worker and returns its id.
    pub fn register(&mut self, name: &str, now: Instant) -> String {
        let id = format!("w{}", self.next_worker);
        self.next_worker += 1;
        let state = WorkerState { name: name.to_string(), last_seen: now, holding: None };
        self.workers.insert(id.clone(), state);
        id
    }

    /// Whether `worker` is registered (false after a coordinator restart).
    pub fn knows(&mut self, worker: &str, now: Instant) -> bool {
        match self.workers.get_mut(worker) {
            Some(w) => {
                w.last_seen = now;
                true
            }
            None => false,
        }
    }

    /// The next job for `worker`. A worker computes one job at a time, so one that asks
    /// while it holds a live lease never got the reply that granted it (the connection
    /// dropped): it gets the same job and lease again, extended, instead of a second job
    /// while the first waits for its lease to run out.
    pub fn lease(&mut self, worker: &str, now: Instant) -> LeaseOutcome {
        if self.finished() {
            return LeaseOutcome::Finished;
        }
        if let Some(lease) = self.held_by(worker, now) {
            return LeaseOutcome::Job(lease);
        }
        let next = if self.calibrating {
            // Only the calibration job may go out; it sits at the front when queued.
            self.queue
                .front()
                .copied()
                .filter(|&i| self.jobs[i].spec.work == Work::Calibration)
                .inspect(|_| {
                    self.queue.pop_front();
                })
        } else {
            self.queue.pop_front()
        };
        let Some(i) = next else { return LeaseOutcome::Wait };
        let lease_id = self.next_lease;
        self.next_lease += 1;
        if let Some(w) = self.workers.get_mut(worker) {
            w.holding = Some((i, lease_id));
        }
        let job = &mut self.jobs[i];
        job.status = Status::Leased {
            worker: worker.to_string(),
            lease_id,
            deadline: now + self.lease_length,
        };
        LeaseOutcome::Job(Lease { spec: job.spec.clone(), lease_id })
    }

    /// The live lease `worker` holds, extended.
    fn held_by(&mut self, worker: &str, now: Instant) -> Option<Lease> {
        let (i, lease_id) = self.workers.get(worker)?.holding?;
        let job = &mut self.jobs[i];
        match &mut job.status {
            Status::Leased { worker: w, lease_id: l, deadline }
                if w == worker && *l == lease_id && *deadline > now =>
            {
                *deadline = now + self.lease_length;
                Some(Lease { spec: job.spec.clone(), lease_id })
            }
            _ => None,
        }
    }

    /// Extends `worker`'s lease on `job`; false when the job is no longer leased to it.
    pub fn heartbeat(&mut self, worker: &str, job: &str, lease_id: u64, now: Instant) -> bool {
        let Some(&i) = self.index.get(job) else { return false };
        match &mut self.jobs[i].status {
            Status::Leased { worker: w, lease_id: l, deadline }
                if w == worker && *l == lease_id =>
            {
                *deadline = now + self.lease_length;
                true
            }
            _ => false,
        }
    }

    /// The job with this id.
    pub fn spec(&self, job: &str) -> Option<JobSpec> {
        self.index.get(job).map(|&i| self.jobs[i].spec.clone())
    }

    /// `worker` hands in `job` under `lease_id`: marks it done if that is the job's live
    /// lease.
    pub fn complete(&mut self, worker: &str, job: &str, lease_id: u64, now: Instant) -> Completion {
        let Some(&i) = self.index.get(job) else { return Completion::NotHeld };
        match &self.jobs[i].status {
            Status::Done => Completion::AlreadyDone,
            Status::Leased { worker: w, lease_id: l, deadline }
                if w == worker && *l == lease_id && *deadline > now =>
            {
                self.finish(i);
                Completion::Accepted
            }
            _ => Completion::NotHeld,
        }
    }

    fn finish(&mut self, i: usize) {
        let state = &mut self.jobs[i];
        state.status = Status::Done;
        if state.spec.work == Work::Calibration {
            self.calibrating = false;
        }
    }

    /// A failed try of `job` by `worker` under `lease_id`. A release (the worker shuts down)
    /// puts the job back at the front without counting a try; a permanent failure gives up at
    /// once. Returns the job when it is given up. Ignored unless `worker` holds that lease.
    pub fn fail(
        &mut self,
        worker: &str,
        job: &str,
        lease_id: u64,
        failure: Failure<'_>,
    ) -> Option<GivenUp> {
        let &i = self.index.get(job)?;
        match &self.jobs[i].status {
            Status::Leased { worker: w, lease_id: l, .. } if w == worker && *l == lease_id => {}
            _ => return None,
        }
        if failure.release {
            self.jobs[i].status = Status::Queued;
            self.queue.push_front(i);
            return None;
        }
        self.retry_or_give_up(i, failure.stage, failure.message, failure.permanent)
    }

    fn retry_or_give_up(
        &mut self,
        i: usize,
        stage: &str,
        message: &str,
        permanent: bool,
    ) -> Option<GivenUp> {
        let max_attempts = self.max_attempts;
        let job = &mut self.jobs[i];
        job.attempts += 1;
        if permanent || job.attempts >= max_attempts {
            job.status = Status::Failed;
            if job.spec.work == Work::Calibration {
                // Without a noise level nothing can run: the run loop sees this and stops.
                self.calibrating = false;
            }
            let tries = job.attempts;
            return Some(GivenUp {
                spec: job.spec.clone(),
                stage: stage.to_string(),
                message: format!("{message} (after {tries} tries)"),
            });
        }
        job.status = Status::Queued;
        self.queue.push_back(i);
        self.retries += 1;
        None
    }

    /// Takes back leases whose deadline passed (their worker died or hangs); returns the jobs
    /// given up because of it. The run loop calls it a few times a second.
    pub fn expire(&mut self, now: Instant) -> Vec<GivenUp> {
        let expired: Vec<(usize, String)> = self
            .jobs
            .iter()
            .enumerate()
            .filter_map(|(i, j)| match &j.status {
                Status::Leased { worker, deadline, .. } if *deadline <= now => {
                    Some((i, worker.clone()))
                }
                _ => None,
            })
            .collect();
        let mut given_up = Vec::new();
        for (i, worker) in expired {
            let name = self.workers.get(&worker).map_or("?", |w| w.name.as_str()).to_string();
            let message = format!("lease expired: worker {worker} ({name}) stopped heartbeating");
            given_up.extend(self.retry_or_give_up(i, "lease", &message, false));
        }
        let horizon = self.lease_length * 4;
        self.workers.retain(|_, w| now.saturating_duration_since(w.last_seen) < horizon);
        given_up
    }

    /// Whether every job is done or given up.
    pub fn finished(&self) -> bool {
        self.jobs.iter().all(|j| matches!(j.status, Status::Done | Status::Failed))
    }

    /// Whether the calibration job was given up (the sweep cannot go on).
    pub fn calibration_failed(&self) -> bool {
        self.jobs.iter().any(|j| j.spec.work == Work::Calibration && j.status == Status::Failed)
    }

    /// Whether the calibration job is still to be done.
    pub fn calibrating(&self) -> bool {
        self.calibrating
    }

    /// Counts for progress and metrics.
    pub fn counts(&self, now: Instant) -> Counts {
        let mut c =
            Counts { total: self.jobs.len() as u64, retries: self.retries, ..Counts::default() };
        for job in &self.jobs {
            match job.status {
                Status::Queued => c.queued += 1,
                Status::Leased { .. } => c.leased += 1,
                Status::Done => c.done += 1,
                Status::Failed => c.failed += 1,
            }
        }
        c.workers = self
            .workers
            .values()
            .filter(|w| now.saturating_duration_since(w.last_seen) < self.lease_length)
            .count() as u64;
        c
    }
}

/// How a try failed.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    /// Where.
    pub stage: &'a str,
    /// Why.
    pub message: &'a str,
    /// Given back unharmed (not a failure).
    pub release: bool,
    /// Retrying cannot help.
    pub permanent: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(fact: usize) -> JobSpec {
        JobSpec { id: format!("{fact}:0-2"), work: Work::Trace { fact, layers: 0..2 } }
    }

    fn calibration() -> JobSpec {
        JobSpec { id: "calibration".into(), work: Work::Calibration }
    }

    fn leased(outcome: LeaseOutcome) -> Lease {
        match outcome {
            LeaseOutcome::Job(lease) => lease,
            other => panic!("expected a job, got {other:?}"),
        }
    }

    const FAIL: Failure<'static> =
        Failure { stage: "trace", message: "boom", release: false, permanent: false };

    #[test]
    fn calibration_goes_first_and_alone() {
        let mut s = Scheduler::new(Duration::from_secs(10), 3);
        let now = Instant::now();
        s.add([trace(0), calibration(), trace(1)], |_| false);
        let w = s.register("a", now);
        let cal = leased(s.lease(&w, now));
        assert_eq!(cal.spec.work, Work::Calibration);
        let other = s.register("b", now);
        assert_eq!(s.lease(&other, now), LeaseOutcome::Wait);
        assert!(matches!(s.complete(&w, "calibration", cal.lease_id, now), Completion::Accepted));
        assert_eq!(leased(s.lease(&w, now)).spec.id, "0:0-2");
    }

    #[test]
    fn expired_leases_retry_then_give_up() {
        let mut s = Scheduler::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        s.add([trace(0)], |_| false);
        let w = s.register("a", t0);
        let first = leased(s.lease(&w, t0));
        // Heartbeats keep it.
        assert!(s.heartbeat(&w, &first.spec.id, first.lease_id, t0 + Duration::from_secs(8)));
        assert!(s.expire(t0 + Duration::from_secs(15)).is_empty());
        assert_eq!(s.counts(t0).leased, 1);
        // Silence loses it: queued again, one try counted.
        assert!(s.expire(t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(s.counts(t0).retries, 1);
        let t1 = t0 + Duration::from_secs(31);
        let second = leased(s.lease(&w, t1));
        assert!(!s.heartbeat(&w, &first.spec.id, first.lease_id, t1), "old lease is gone");
        let given_up = s.expire(t1 + Duration::from_secs(11));
        assert_eq!(given_up.len(), 1);
        assert!(given_up[0].message.contains("after 2 tries"), "{given_up:?}");
        assert_eq!(given_up[0].spec, second.spec);
        assert!(s.finished());
        assert_eq!(s.lease(&w, t1), LeaseOutcome::Finished);
    }

    #[test]
    fn only_the_live_lease_holder_completes_and_only_once() {
        let mut s = Scheduler::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        s.add([trace(0), trace(1), trace(2)], |id| id == "1:0-2");
        assert_eq!(s.counts(t0).done, 1);
        let a = s.register("a", t0);
        let lease = leased(s.lease(&a, t0));
        let b = s.register("b", t0);
        // Nobody else completes a's job, nor a under another lease id or after its deadline.
        assert_eq!(s.complete(&b, &lease.spec.id, lease.lease_id, t0), Completion::NotHeld);
        assert_eq!(s.complete(&a, &lease.spec.id, lease.lease_id + 1, t0), Completion::NotHeld);
        let late = t0 + Duration::from_secs(10);
        assert_eq!(s.complete(&a, &lease.spec.id, lease.lease_id, late), Completion::NotHeld);
        // Nor a job that is queued, unknown, or done in an earlier run.
        assert_eq!(s.complete(&a, "2:0-2", 0, t0), Completion::NotHeld);
        assert_eq!(s.complete(&a, "9:0-2", 0, t0), Completion::NotHeld);
        assert_eq!(s.complete(&a, "1:0-2", 0, t0), Completion::AlreadyDone);
        // Expired and leased to b: b's lease counts, a's late result does not.
        s.expire(t0 + Duration::from_secs(11));
        let t1 = t0 + Duration::from_secs(12);
        let other = leased(s.lease(&b, t1));
        assert_eq!(other.spec.id, "2:0-2", "an expired job goes to the back of the queue");
        let c = s.register("c", t1);
        let again = leased(s.lease(&c, t1));
        assert_eq!(lease.spec, again.spec);
        assert_eq!(s.complete(&a, &lease.spec.id, lease.lease_id, t1), Completion::NotHeld);
        assert!(matches!(s.complete(&c, &again.spec.id, again.lease_id, t1), Completion::Accepted));
        // A duplicate hand-in is harmless.
        assert_eq!(s.complete(&c, &again.spec.id, again.lease_id, t1), Completion::AlreadyDone);
        assert_eq!(s.counts(t1).done, 2);
    }

    #[test]
    fn failures_retry_releases_do_not_count_and_permanent_ones_stop() {
        let mut s = Scheduler::new(Duration::from_secs(10), 2);
        let now = Instant::now();
        s.add([trace(0), trace(1)], |_| false);
        let w = s.register("a", now);
        let l = leased(s.lease(&w, now));
        let release = Failure { release: true, ..FAIL };
        assert!(s.fail(&w, &l.spec.id, l.lease_id, release).is_none());
        let l = leased(s.lease(&w, now));
        assert_eq!(l.spec.id, "0:0-2", "a released job goes back to the front");
        assert!(s.fail("other", &l.spec.id, l.lease_id, FAIL).is_none(), "not its lease");
        assert!(s.fail(&w, &l.spec.id, l.lease_id, FAIL).is_none());
        let l1 = leased(s.lease(&w, now));
        assert_eq!(l1.spec.id, "1:0-2");
        let permanent = Failure { permanent: true, ..FAIL };
        let given_up = s.fail(&w, &l1.spec.id, l1.lease_id, permanent).expect("given up");
        assert!(given_up.message.contains("after 1 tries"));
        let l0 = leased(s.lease(&w, now));
        assert_eq!(l0.spec.id, "0:0-2");
        assert!(s.fail(&w, &l0.spec.id, l0.lease_id, FAIL).is_some(), "second try was the last");
        let c = s.counts(now);
        assert_eq!((c.failed, c.done, c.retries), (2, 0, 1));
    }

    #[test]
    fn a_worker_asking_again_gets_the_lease_it_holds() {
        let mut s = Scheduler::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        s.add([trace(0), trace(1)], |_| false);
        let a = s.register("a", t0);
        let first = leased(s.lease(&a, t0));
        // The reply was lost; a asks again near the end of the lease and gets it again,
        // extended.
        let t1 = t0 + Duration::from_secs(9);
        assert_eq!(leased(s.lease(&a, t1)), first);
        assert!(s.expire(t0 + Duration::from_secs(12)).is_empty(), "extended");
        assert_eq!(s.counts(t1).leased, 1);
        // Once handed in, the next request gets the next job.
        assert_eq!(s.complete(&a, &first.spec.id, first.lease_id, t1), Completion::Accepted);
        let second = leased(s.lease(&a, t1));
        assert_eq!(second.spec.id, "1:0-2");
        // An expired lease is not given back: the job went to the queue.
        s.expire(t1 + Duration::from_secs(11));
        let t2 = t1 + Duration::from_secs(12);
        let again = leased(s.lease(&a, t2));
        assert_ne!(again.lease_id, second.lease_id);
        assert_eq!(s.counts(t2).retries, 1);
    }
}

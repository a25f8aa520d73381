//! Locking that survives a panic elsewhere, [`Gather`]: calls that
//! arrive together, made as one, [`Replies`]: where the members of such a
//! batch find their answers, [`Finishing`]: a shared call that goes on
//! when the request that made it is cancelled, and [`with_scratch`]: a
//! per-thread buffer for text made on every request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// Runs `build` on the `String` that `buffer` holds for this thread,
/// cleared: text made on every request (a header value, a key) is written
/// there and copied once into its own allocation, with no `String` made
/// and dropped each time. Where the buffer cannot be had (the thread is
/// ending, or it is in use further up this thread's stack), `build` runs
/// on a `String` of its own: never a panic.
///
/// The buffer keeps the capacity of the longest text made on its thread:
/// only for text whose length is bounded.
///
/// ```
/// use std::cell::RefCell;
/// use tower_redis_core::sync::with_scratch;
///
/// thread_local! {
///     static KEY: RefCell<String> = const { RefCell::new(String::new()) };
/// }
/// let key = |id: u32| {
///     with_scratch(&KEY, |text| {
///         text.push_str("user:");
///         text.push_str(&id.to_string());
///         std::sync::Arc::<str>::from(text.as_str())
///     })
/// };
/// assert_eq!(&*key(7), "user:7");
/// assert_eq!(&*key(12), "user:12");
/// // In use further up the stack: a String of its own.
/// let nested = with_scratch(&KEY, |outer| {
///     outer.push_str("outer");
///     with_scratch(&KEY, |inner| {
///         inner.push_str("inner");
///         inner.clone()
///     })
/// });
/// assert_eq!(nested, "inner");
/// ```
pub fn with_scratch<R>(
    buffer: &'static std::thread::LocalKey<std::cell::RefCell<String>>,
    mut build: impl FnMut(&mut String) -> R,
) -> R {
    let reused = buffer.try_with(|text| {
        let mut text = text.try_borrow_mut().ok()?;
        text.clear();
        Some(build(&mut text))
    });
    match reused {
        Ok(Some(made)) => made,
        _ => build(&mut String::new()),
    }
}

/// Locks `mutex`, taking the guard even if a previous holder panicked.
///
/// Every mutex in tower-redis guards state that stays consistent between
/// statements (counters, queues, LRU maps), so a panic in one request must
/// not turn every later request into a panic too.
///
/// ```
/// use std::sync::Mutex;
/// use tower_redis_core::sync::lock;
///
/// let counter = Mutex::new(0);
/// *lock(&counter) += 1;
/// assert_eq!(*lock(&counter), 1);
/// ```
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Calls that arrive while another is in flight, made as one call.
///
/// A call that finds no other in flight takes its own path (`alone`): no
/// lock, no task hop, nothing added to its latency. A call that finds
/// others in flight joins the batch being formed, or starts one. The call
/// that starts a batch leads it: it yields once to the scheduler, so that
/// the calls ready at the same moment can join, then makes one call for
/// all of them (`together`, its own query first) and hands each member its
/// answer. Batches do not wait for each other: several can be in flight.
///
/// A batch whose leader's request is cancelled once the batch's call is
/// under way still answers its members: the call goes on in a task of its
/// own ([`Finishing`], within a Tokio runtime), so that they neither make
/// the call again nor wait for Redis twice.
///
/// Nobody waits long for a batch that cannot answer: when the leader's
/// future is dropped before the call (during its yield), when `together`
/// returns fewer answers than queries, or when no answer came within
/// `patience` (the leader's future is no longer polled, say), the members
/// left without one make their own call (`alone`). A batch holds at most
/// `max` members besides its leader; later calls go alone until the next
/// batch forms.
///
/// Under load this turns many round trips into one pipeline: one write,
/// one reply to parse, one timer and one connection checkout for the
/// batch, instead of one each.
///
/// ```
/// use tower_redis_core::sync::Gather;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let gather: Gather<u32, u32> = Gather::new(64, std::time::Duration::from_secs(1));
/// // Alone: the call's own path.
/// let doubled = gather
///     .run(|| 21, || async { 42 }, |queries| async move {
///         queries.into_iter().map(|q| q * 2).collect()
///     })
///     .await;
/// assert_eq!(doubled, 42);
/// # }
/// ```
#[derive(Debug)]
pub struct Gather<Q, R> {
    /// Calls between entering [`Gather::run`] and leaving it.
    active: AtomicUsize,
    /// The batch being formed, if one is.
    forming: Mutex<Option<Forming<Q, R>>>,
    max: usize,
    /// How long a member waits for its batch's answer.
    patience: Duration,
}

/// A batch being formed: its members' queries, and what answers them
/// (made with the first member; dropped unanswered, with the batch
/// abandoned by its leader, it sends them on alone at once). Nothing is
/// allocated for a batch nobody joins.
#[derive(Debug)]
struct Forming<Q, R> {
    queries: Vec<Q>,
    answering: Option<Answering<R>>,
}

/// What a call does with the batch being formed.
enum Role<Q, R> {
    /// It starts a batch (with its own query).
    Lead(Q),
    /// Its answer will be the batch's at this index.
    Follow(Arc<Replies<R>>, usize),
    /// The batch being formed is full.
    Alone,
}

impl<Q, R> Gather<Q, R> {
    /// A gather whose batches take at most `max` members besides their
    /// leader (at least 1), each of which waits at most `patience` for its
    /// answer before it makes its own call: make it longer than the
    /// batch's call can take.
    pub fn new(max: usize, patience: Duration) -> Self {
        Self {
            active: AtomicUsize::new(0),
            forming: Mutex::new(None),
            max: max.max(1),
            patience,
        }
    }

    /// Makes one call: alone when no other is in flight, else in a batch.
    ///
    /// `query` builds what a batch needs of this call (only when others
    /// are in flight); `alone` makes the call by itself; `together` makes
    /// the call for a batch's queries, in order, and returns one answer per
    /// query, in the same order. The batch's call owns what it needs (it
    /// may go on in a task of its own), and is boxed: only a leader pays
    /// for it, and its type stays out of every call's future.
    pub async fn run<AF, TF>(
        &self,
        query: impl FnOnce() -> Q,
        alone: impl FnOnce() -> AF,
        together: impl FnOnce(Vec<Q>) -> TF,
    ) -> R
    where
        AF: Future<Output = R>,
        TF: Future<Output = Vec<R>> + Send + 'static,
        R: Send + 'static,
    {
        let active = Active::enter(&self.active);
        if !active.was_alone()
            && let Some(answer) = self.gathered(query, together).await
        {
            return answer;
        }
        // Awaited in one place only: the future holds one `alone` call.
        alone().await
    }

    /// The answer of the batch this call joins or leads; `None` when it
    /// must make its own call (the batch is full, was abandoned, or left
    /// it unanswered; or nobody joined the batch it leads).
    async fn gathered<TF>(
        &self,
        query: impl FnOnce() -> Q,
        together: impl FnOnce(Vec<Q>) -> TF,
    ) -> Option<R>
    where
        TF: Future<Output = Vec<R>> + Send + 'static,
        R: Send + 'static,
    {
        let query = query();
        let role = {
            let mut forming = lock(&self.forming);
            match &mut *forming {
                // A member's answer is its index among the members.
                Some(batch) if batch.queries.len() < self.max => {
                    let index = batch.queries.len();
                    batch.queries.push(query);
                    let answering = batch.answering.get_or_insert_with(Answering::new);
                    Role::Follow(answering.replies(), index)
                }
                Some(_) => Role::Alone,
                None => {
                    *forming = Some(Forming {
                        queries: Vec::new(),
                        answering: None,
                    });
                    Role::Lead(query)
                }
            }
        };
        let query = match role {
            Role::Alone => return None,
            // Abandoned, left unanswered, or too late: `None`.
            Role::Follow(replies, index) => {
                return tokio::time::timeout(self.patience, replies.take(index))
                    .await
                    .ok()
                    .flatten();
            }
            Role::Lead(query) => query,
        };
        let mut leading = Leading {
            forming: &self.forming,
            closed: false,
        };
        tokio::task::yield_now().await;
        let Forming {
            mut queries,
            answering,
        } = leading.close()?;
        // Nobody joined: this call goes alone.
        let answering = answering.filter(|_| !queries.is_empty())?;
        queries.insert(0, query);
        let call = together(queries);
        Finishing::new(async move {
            let mut answers = call.await.into_iter();
            let own = answers.next();
            answering.answer(answers);
            own
        })
        .await
    }
}

/// Where the members of one batch find their answers: set once, by the
/// batch's call, and each taken once, by its member's index. One per
/// batch, shared by its members, so that joining a batch allocates
/// nothing (a channel per member did; and a member's channel, made on its
/// thread and freed on the leader's, made glibc's allocator take a lock).
///
/// ```
/// use std::sync::Arc;
/// use tower_redis_core::sync::{Answering, Replies};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let answering = Answering::new();
/// let replies: Arc<Replies<&str>> = answering.replies();
/// let member = tokio::spawn({
///     let replies = Arc::clone(&replies);
///     async move { replies.take(1).await }
/// });
/// answering.answer(["for member 0", "for member 1"]);
/// assert_eq!(member.await.unwrap(), Some("for member 1"));
/// // Taken once; and an index the batch did not answer has none.
/// assert_eq!(replies.take(1).await, None);
/// assert_eq!(replies.take(2).await, None);
/// # }
/// ```
#[derive(Debug)]
pub struct Replies<R> {
    /// The answers, in the members' order: none when the batch's call went
    /// away without answering.
    answers: OnceLock<Vec<Mutex<Option<R>>>>,
    ready: Notify,
}

impl<R> Default for Replies<R> {
    fn default() -> Self {
        Self {
            answers: OnceLock::new(),
            ready: Notify::new(),
        }
    }
}

impl<R> Replies<R> {
    /// The answer at `index`, once the batch has answered: `None` when it
    /// has none for it (left unanswered, answered fewer, or already taken).
    pub async fn take(&self, index: usize) -> Option<R> {
        loop {
            // Listening before looking: answers set after the look wake
            // this listener (`notify_waiters` wakes every `Notified` made
            // before it, polled or not).
            let notified = self.ready.notified();
            if let Some(answers) = self.answers.get() {
                return answers.get(index).and_then(|slot| lock(slot).take());
            }
            notified.await;
        }
    }
}

/// Answers a batch's [`Replies`]: with [`answer`](Self::answer), or,
/// dropped before (its call cancelled, or never run), with none, so that
/// nobody waits for an answer that cannot come.
#[derive(Debug)]
pub struct Answering<R>(Arc<Replies<R>>);

impl<R> Answering<R> {
    /// The answering of a new batch.
    pub fn new() -> Self {
        Self(Arc::default())
    }

    /// Where the batch's members find their answers.
    pub fn replies(&self) -> Arc<Replies<R>> {
        Arc::clone(&self.0)
    }

    /// Gives the members their answers, in order, and wakes them.
    pub fn answer(self, answers: impl IntoIterator<Item = R>) {
        let _ = self
            .0
            .answers
            .set(answers.into_iter().map(|a| Mutex::new(Some(a))).collect());
        // Dropped here: the members are woken.
    }
}

impl<R> Default for Answering<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R> Drop for Answering<R> {
    fn drop(&mut self) {
        let _ = self.0.answers.set(Vec::new());
        self.0.ready.notify_waiters();
    }
}

/// A call made for others besides its caller (a batch's, whose members
/// wait for its answers), which goes on when the caller's future is
/// dropped (its request was cancelled): it is then spawned on the Tokio
/// runtime it is dropped in, and finishes in a task of its own. Making it
/// again for the others would send it twice (a rate limit's decision
/// would count twice) and, while Redis hangs, make them wait for it twice.
/// Await it to run it.
///
/// A call whose poll panicked is not polled again, even when the panic was
/// caught; neither is one dropped outside a runtime. Those who wait for its
/// answers are then told none comes (their channels close, or their
/// [`Answering`] is dropped).
///
/// ```
/// use tower_redis_core::sync::Finishing;
/// use tokio::sync::oneshot;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let (tell, told) = oneshot::channel();
/// let call = Finishing::new(async move {
///     let _ = tell.send("for the others");
///     "for the caller"
/// });
/// // The caller goes away before polling it: the call still runs.
/// drop(call);
/// assert_eq!(told.await, Ok("for the others"));
/// # }
/// ```
pub struct Finishing<T: Send + 'static> {
    /// The call, until it has returned.
    call: Option<Pin<Box<dyn Future<Output = T> + Send>>>,
    /// Set while the call is polled: still set when the poll unwound.
    polling: bool,
}

impl<T: Send + 'static> Finishing<T> {
    /// The call `call`, not started yet.
    pub fn new(call: impl Future<Output = T> + Send + 'static) -> Self {
        Self {
            call: Some(Box::pin(call)),
            polling: false,
        }
    }
}

/// Awaiting it runs the call to its end, and answers what it returns.
impl<T: Send + 'static> Future for Finishing<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        let this = &mut *self;
        let Some(call) = this.call.as_mut() else {
            // Polled again after its answer: it has nothing more to give.
            return std::task::Poll::Pending;
        };
        this.polling = true;
        let polled = call.as_mut().poll(cx);
        this.polling = false;
        let answer = std::task::ready!(polled);
        this.call = None;
        std::task::Poll::Ready(answer)
    }
}

impl<T: Send + 'static> std::fmt::Debug for Finishing<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finishing")
            .field("under_way", &self.call.is_some())
            .finish()
    }
}

impl<T: Send + 'static> Drop for Finishing<T> {
    fn drop(&mut self) {
        // A poll of the call that unwound (a panic in it): it cannot be
        // polled again.
        if self.polling {
            return;
        }
        if let Some(call) = self.call.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(call);
        }
    }
}

/// One call counted in a count of calls in flight until it is dropped
/// (answered or cancelled): how [`Gather::run`] (and the rate limiter's own
/// batching) tells a call alone from one that has company.
///
/// ```
/// use std::sync::atomic::AtomicUsize;
/// use tower_redis_core::sync::Active;
///
/// let in_flight = AtomicUsize::new(0);
/// let first = Active::enter(&in_flight);
/// assert!(first.was_alone());
/// assert!(!Active::enter(&in_flight).was_alone());
/// drop(first);
/// assert!(Active::enter(&in_flight).was_alone());
/// ```
#[derive(Debug)]
pub struct Active<'a> {
    active: &'a AtomicUsize,
    was_alone: bool,
}

impl<'a> Active<'a> {
    /// Counts a call in `active`.
    pub fn enter(active: &'a AtomicUsize) -> Self {
        let before = active.fetch_add(1, Ordering::AcqRel);
        Self {
            active,
            was_alone: before == 0,
        }
    }

    /// No other call was counted when this one entered.
    pub fn was_alone(&self) -> bool {
        self.was_alone
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The leader of a batch being formed. Closing it takes the members; a
/// leader dropped before closing (its call cancelled during the yield)
/// drops them, so that each makes its own call.
struct Leading<'a, Q, R> {
    forming: &'a Mutex<Option<Forming<Q, R>>>,
    closed: bool,
}

impl<Q, R> Leading<'_, Q, R> {
    fn close(&mut self) -> Option<Forming<Q, R>> {
        self.closed = true;
        lock(self.forming).take()
    }
}

impl<Q, R> Drop for Leading<'_, Q, R> {
    fn drop(&mut self) {
        // Its members' replies are left unanswered: they go alone.
        if !self.closed {
            drop(self.close());
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    #[test]
    fn a_poisoned_mutex_still_hands_out_its_value() {
        let mutex = Mutex::new(vec![1, 2]);
        let panicked = std::panic::catch_unwind(|| {
            let mut guard = lock(&mutex);
            guard.push(3);
            panic!("a holder panics");
        });
        assert!(panicked.is_err());
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex), [1, 2, 3]);
    }

    /// How long the tests' members wait for a batch's answer.
    const PATIENCE: Duration = Duration::from_secs(5);

    /// What a test's calls did: the queries of each batch, and how many
    /// calls went alone.
    #[derive(Default)]
    struct Calls {
        batches: Mutex<Vec<Vec<u32>>>,
        alone: AtomicUsize,
        /// Holds the next batch's call until it resolves.
        held_batch: Mutex<Option<oneshot::Receiver<()>>>,
    }

    /// One call of `query` through `gather`: alone it answers `query * 10`
    /// (after `hold` resolves), in a batch `query * 100`; `together`
    /// answers the first `answered` queries of a batch at most.
    async fn call(
        gather: &Gather<u32, u32>,
        calls: &Arc<Calls>,
        query: u32,
        hold: Option<oneshot::Receiver<()>>,
        answered: usize,
    ) -> u32 {
        gather
            .run(
                || query,
                || async move {
                    calls.alone.fetch_add(1, Ordering::SeqCst);
                    if let Some(hold) = hold {
                        let _ = hold.await;
                    }
                    query * 10
                },
                |queries| {
                    let calls = Arc::clone(calls);
                    async move {
                        lock(&calls.batches).push(queries.clone());
                        // A batch's call in flight until the test lets it go.
                        let held = lock(&calls.held_batch).take();
                        if let Some(held) = held {
                            let _ = held.await;
                        }
                        queries
                            .into_iter()
                            .take(answered)
                            .map(|q| q * 100)
                            .collect()
                    }
                },
            )
            .await
    }

    /// A call in flight until the returned sender is dropped or used.
    fn in_flight(
        gather: &Arc<Gather<u32, u32>>,
        calls: &Arc<Calls>,
    ) -> (oneshot::Sender<()>, tokio::task::JoinHandle<u32>) {
        let (release, hold) = oneshot::channel();
        let (gather, calls) = (Arc::clone(gather), Arc::clone(calls));
        let task =
            tokio::spawn(async move { call(&gather, &calls, 1, Some(hold), usize::MAX).await });
        (release, task)
    }

    /// A gather of batches of `max` members, with a call in flight (until
    /// the sender is used or dropped) and everything settled.
    async fn one_in_flight(
        max: usize,
    ) -> (
        Arc<Gather<u32, u32>>,
        Arc<Calls>,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<u32>,
    ) {
        let (gather, calls) = (
            Arc::new(Gather::new(max, PATIENCE)),
            Arc::new(Calls::default()),
        );
        let (release, first) = in_flight(&gather, &calls);
        settle().await;
        (gather, calls, release, first)
    }

    /// The call of query 2, polled once: it leads a batch and is in its
    /// yield, and is not polled again unless its caller does.
    async fn leading_in_its_yield<'a>(
        gather: &'a Gather<u32, u32>,
        calls: &'a Arc<Calls>,
    ) -> std::pin::Pin<Box<impl Future<Output = u32> + 'a>> {
        let mut leader = Box::pin(call(gather, calls, 2, None, usize::MAX));
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(leader.as_mut().poll(cx))).await;
        assert!(polled.is_pending(), "the leader yields once");
        leader
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Calls of `queries`, each in a task of its own, whose batches
    /// answer `answered` queries at most.
    fn spawn_calls(
        gather: &Arc<Gather<u32, u32>>,
        calls: &Arc<Calls>,
        queries: std::ops::RangeInclusive<u32>,
        answered: usize,
    ) -> Vec<tokio::task::JoinHandle<u32>> {
        queries
            .map(|query| {
                let (gather, calls) = (Arc::clone(gather), Arc::clone(calls));
                tokio::spawn(async move { call(&gather, &calls, query, None, answered).await })
            })
            .collect()
    }

    /// The answers of `tasks`, in order, each within a deadline.
    async fn answers(tasks: Vec<tokio::task::JoinHandle<u32>>) -> Vec<u32> {
        let mut answers = Vec::new();
        for task in tasks {
            answers.push(
                tokio::time::timeout(Duration::from_secs(10), task)
                    .await
                    .expect("answered in time, not left waiting")
                    .expect("no panic"),
            );
        }
        answers
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_call_alone_takes_its_own_path() {
        let (gather, calls) = (Gather::new(8, PATIENCE), Arc::new(Calls::default()));
        assert_eq!(call(&gather, &calls, 7, None, usize::MAX).await, 70);
        assert_eq!(call(&gather, &calls, 8, None, usize::MAX).await, 80);
        assert_eq!(calls.alone.load(Ordering::SeqCst), 2);
        assert!(lock(&calls.batches).is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_arriving_while_one_is_in_flight_make_one_call_in_order() {
        let (gather, calls, release, first) = one_in_flight(8).await;
        let answers = answers(spawn_calls(&gather, &calls, 2..=6, usize::MAX)).await;
        assert_eq!(answers, [200, 300, 400, 500, 600]);
        assert_eq!(*lock(&calls.batches), [vec![2, 3, 4, 5, 6]]);
        release.send(()).expect("the first call waits");
        assert_eq!(first.await.expect("no panic"), 10);
        assert_eq!(calls.alone.load(Ordering::SeqCst), 1);
    }

    /// Many calls at once on a multi-threaded runtime, while one is in
    /// flight: batches form and are answered on both workers at the same
    /// time, and each call gets the answer to its own query, whichever
    /// batch it went in, or none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_on_several_threads_each_get_their_own_answer() {
        // A patience longer than the test's deadline: a member whose
        // batch's answer never woke it fails the test, rather than going
        // alone late.
        let gather = Arc::new(Gather::new(16, Duration::from_secs(120)));
        let calls = Arc::new(Calls::default());
        let (release, hold) = oneshot::channel();
        let first = {
            let (gather, calls) = (Arc::clone(&gather), Arc::clone(&calls));
            tokio::spawn(async move { call(&gather, &calls, 1, Some(hold), usize::MAX).await })
        };
        while gather.active.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let tasks: Vec<_> = (2..2_002)
            .map(|query| {
                let (gather, calls) = (Arc::clone(&gather), Arc::clone(&calls));
                tokio::spawn(async move {
                    (query, call(&gather, &calls, query, None, usize::MAX).await)
                })
            })
            .collect();
        let answered = tokio::time::timeout(
            Duration::from_secs(30),
            futures_util::future::join_all(tasks),
        )
        .await
        .expect("every call is answered within 30 s");
        for task in answered {
            let (query, answer) = task.expect("no call panics");
            assert!(
                answer == query * 100 || answer == query * 10,
                "call {query} was answered {answer}"
            );
        }
        {
            let batches = lock(&calls.batches);
            assert!(
                batches.iter().any(|batch| batch.len() >= 2),
                "batches formed: {batches:?}"
            );
        }
        release.send(()).expect("the first call waits");
        assert_eq!(first.await.expect("no panic"), 10);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_batch_sends_later_calls_alone() {
        let (gather, calls, release, first) = one_in_flight(2).await;
        let answers = answers(spawn_calls(&gather, &calls, 2..=6, usize::MAX)).await;
        // 2 leads, 3 and 4 join (the most a batch takes), 5 and 6 go alone.
        assert_eq!(answers, [200, 300, 400, 50, 60]);
        assert_eq!(*lock(&calls.batches), [vec![2, 3, 4]]);
        drop(release);
        first.await.expect("no panic");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn members_of_a_batch_whose_leader_is_dropped_make_their_own_calls() {
        let (gather, calls, release, first) = one_in_flight(8).await;
        // The leader starts the batch and yields ...
        let leader = leading_in_its_yield(&gather, &calls).await;
        // ... two calls join it ...
        let members = spawn_calls(&gather, &calls, 3..=4, usize::MAX);
        settle().await;
        // ... and the leader is dropped (its request cancelled).
        let dropped = std::time::Instant::now();
        drop(leader);
        let answers = answers(members).await;
        assert_eq!(answers, [30, 40]);
        assert!(
            dropped.elapsed() < PATIENCE,
            "the members went alone at once, not after the patience"
        );
        assert!(lock(&calls.batches).is_empty());
        drop(release);
        first.await.expect("no panic");
    }

    /// A leader whose request is cancelled while its batch's call is under
    /// way: the call goes on without it and answers the members, who make
    /// no call of their own (while Redis hangs, that call would make them
    /// wait a second command timeout).
    #[tokio::test(flavor = "current_thread")]
    async fn members_of_a_batch_whose_leader_is_dropped_mid_call_get_the_batch_s_answers() {
        let (gather, calls, release, first) = one_in_flight(8).await;
        let (let_go, held) = oneshot::channel();
        *lock(&calls.held_batch) = Some(held);
        let leader = leading_in_its_yield(&gather, &calls).await;
        let members = spawn_calls(&gather, &calls, 3..=4, usize::MAX);
        settle().await;
        // The leader is polled on: it closes the batch and makes its call,
        // which waits.
        let mut leader = leader;
        let polled =
            std::future::poll_fn(|cx| std::task::Poll::Ready(leader.as_mut().poll(cx))).await;
        assert!(polled.is_pending(), "the batch's call is under way");
        assert_eq!(*lock(&calls.batches), [vec![2, 3, 4]]);
        // Its request is cancelled, then the call is answered.
        drop(leader);
        let _ = let_go.send(());
        assert_eq!(answers(members).await, [300, 400]);
        assert_eq!(
            calls.alone.load(Ordering::SeqCst),
            1,
            "only the first call went alone"
        );
        drop(release);
        first.await.expect("no panic");
    }

    /// A call whose poll panicked is not spawned when it is dropped, even
    /// after the panic was caught (as `CatchPanicLayer` would) and nothing
    /// is unwinding any more: it would be polled again. One dropped
    /// between polls is spawned, and finishes.
    #[tokio::test(flavor = "current_thread")]
    async fn a_finishing_call_whose_poll_panicked_is_not_polled_again() {
        /// Panics on its first poll, answers on the next.
        struct PanicsOnce(Arc<AtomicUsize>);
        impl Future for PanicsOnce {
            type Output = ();
            fn poll(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<()> {
                if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("the call panics");
                }
                std::task::Poll::Ready(())
            }
        }
        let polls = Arc::new(AtomicUsize::new(0));
        let mut call = Finishing::new(PanicsOnce(Arc::clone(&polls)));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = Pin::new(&mut call).poll(&mut cx);
        }));
        assert!(caught.is_err(), "the poll panicked");
        drop(call);
        settle().await;
        assert_eq!(polls.load(Ordering::SeqCst), 1, "not polled again");

        // Between polls: spawned, and polled to its end.
        let (tell, told) = oneshot::channel();
        let mut call = Finishing::new(async move {
            tokio::task::yield_now().await;
            let _ = tell.send(());
        });
        assert!(Pin::new(&mut call).poll(&mut cx).is_pending());
        drop(call);
        tokio::time::timeout(Duration::from_secs(10), told)
            .await
            .expect("finished in its own task")
            .expect("answered");
    }

    /// At once: on tokio's paused clock, no member waits out its patience.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn members_a_batch_does_not_answer_make_their_own_calls() {
        let (gather, calls, release, first) = one_in_flight(8).await;
        // The batch answers its first two queries only.
        let started = tokio::time::Instant::now();
        let answers = answers(spawn_calls(&gather, &calls, 2..=5, 2)).await;
        assert!(started.elapsed() < PATIENCE, "the unanswered waited");
        assert_eq!(answers, [200, 300, 40, 50]);
        drop(release);
        first.await.expect("no panic");
    }

    /// A leader that stops being polled (neither answering nor dropped)
    /// holds its members for `patience` at most: then each makes its own
    /// call. The clock is tokio's paused one.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn members_of_a_stalled_batch_make_their_own_calls_after_the_patience() {
        let (gather, calls, release, first) = one_in_flight(8).await;
        let leader = leading_in_its_yield(&gather, &calls).await;
        let started = tokio::time::Instant::now();
        let members = spawn_calls(&gather, &calls, 3..=4, usize::MAX);
        // The leader is kept, never polled again.
        assert_eq!(answers(members).await, [30, 40]);
        assert_eq!(started.elapsed(), PATIENCE, "they waited out the patience");
        assert!(lock(&calls.batches).is_empty());
        drop(leader);
        drop(release);
        first.await.expect("no panic");
    }
}

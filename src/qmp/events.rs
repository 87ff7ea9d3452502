//! The event bus: QMP events go to every client that has finished capabilities negotiation.
//!
//! Lives on the main context (`Rc`, not `Send`). Whoever emits (block-export-del, the mirror
//! job's state changes) holds an `Rc<Events>`; work on other threads posts to the main context
//! first. Each event is stamped with the wall-clock time when it is emitted and rendered by each
//! subscriber in its own style (compact or pretty).

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use ringblk_ring::Remote;
use serde_json::Value;

use super::json::{self, Ordered};

/// One event, as emitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// QAPI's event name (`BLOCK_EXPORT_DELETED`).
    pub name: String,
    /// Its `data` member; `Value::Null` for an event without data.
    pub data: Value,
    /// Wall-clock time of the emission: seconds since the epoch.
    pub seconds: u64,
    /// And microseconds within that second.
    pub microseconds: u32,
}

impl Event {
    /// The message, members in QSD's order: `timestamp`, `event`, `data`.
    pub fn render(&self, pretty: bool) -> String {
        let seconds = Value::from(self.seconds);
        let microseconds = Value::from(self.microseconds);
        let name = Value::String(self.name.clone());
        let timestamp = Ordered::Object(vec![
            ("seconds", Ordered::Value(&seconds)),
            ("microseconds", Ordered::Value(&microseconds)),
        ]);
        let mut members = vec![("timestamp", timestamp), ("event", Ordered::Value(&name))];
        if !self.data.is_null() {
            members.push(("data", Ordered::Value(&self.data)));
        }
        json::render(pretty, members)
    }
}

/// Something that receives events (a QMP client connection).
pub trait Subscriber {
    /// Called for every event; a client that has not negotiated capabilities ignores it.
    fn deliver(&self, event: &Event);
}

thread_local! {
    /// The bus of the main context this thread runs, which [`post`] reaches.
    static BUS: RefCell<Weak<Events>> = const { RefCell::new(Weak::new()) };
}

/// Emits event `name` with `data` from any thread (a write on an iothread crossing its node's
/// threshold): posted to the main context `main`, whose installed bus sends it.
pub fn post(main: &Remote, name: &'static str, data: Value) {
    main.defer(move || {
        if let Some(events) = BUS.with(|bus| bus.borrow().upgrade()) {
            events.emit(name, data);
        }
    });
}

/// The subscribers, in subscription order. Dropped subscribers are pruned on the next emit.
#[derive(Default)]
pub struct Events {
    subscribers: RefCell<Vec<Weak<dyn Subscriber>>>,
}

impl Events {
    /// Makes `events` the bus [`post`] reaches; called on the main context.
    pub fn install(events: &Rc<Events>) {
        BUS.with(|bus| *bus.borrow_mut() = Rc::downgrade(events));
    }

    /// Adds a subscriber; it receives events until it is dropped.
    pub fn subscribe(&self, subscriber: Weak<dyn Subscriber>) {
        self.subscribers.borrow_mut().push(subscriber);
    }

    /// Sends event `name` with `data` (`Value::Null`: none) to every subscriber.
    pub fn emit(&self, name: &str, data: Value) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let event = Event {
            name: name.to_owned(),
            data,
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        };
        // Delivering may close a client, which may emit or subscribe: no borrow across it.
        let subscribers: Vec<_> = {
            let mut list = self.subscribers.borrow_mut();
            list.retain(|s| s.strong_count() > 0);
            list.clone()
        };
        for subscriber in subscribers.iter().filter_map(Weak::upgrade) {
            subscriber.deliver(&event);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[derive(Default)]
    struct Recorder(RefCell<Vec<String>>);

    impl Subscriber for Recorder {
        fn deliver(&self, event: &Event) {
            self.0.borrow_mut().push(event.name.clone());
        }
    }

    #[test]
    fn every_live_subscriber_gets_each_event_in_order() {
        let events = Events::default();
        let a = Rc::new(Recorder::default());
        let b = Rc::new(Recorder::default());
        events.subscribe(Rc::downgrade(&a) as Weak<dyn Subscriber>);
        events.subscribe(Rc::downgrade(&b) as Weak<dyn Subscriber>);
        events.emit("ONE", Value::Null);
        drop(b);
        events.emit("TWO", json!({"id": "x"}));
        assert_eq!(*a.0.borrow(), ["ONE", "TWO"]);
        assert_eq!(events.subscribers.borrow().len(), 1);
    }

    #[test]
    fn events_render_timestamp_first_and_omit_absent_data() {
        let mut event = Event {
            name: "BLOCK_EXPORT_DELETED".to_owned(),
            data: json!({"id": "e"}),
            seconds: 5,
            microseconds: 7,
        };
        assert_eq!(
            event.render(false),
            "{\"timestamp\": {\"seconds\": 5, \"microseconds\": 7}, \
             \"event\": \"BLOCK_EXPORT_DELETED\", \"data\": {\"id\": \"e\"}}\r\n"
        );
        event.data = Value::Null;
        assert!(!event.render(false).contains("data"));
    }
}

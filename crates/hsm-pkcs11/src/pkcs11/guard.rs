//! [`ObjectGuard`]: destroys a session object on every path out of the scope that made it.

use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;

use crate::error::describe;

/// Owns a session object (a generated or unwrapped key) and destroys it when dropped.
pub(crate) struct ObjectGuard<'s> {
    session: &'s Session,
    handle: ObjectHandle,
    what: &'static str,
}

impl<'s> ObjectGuard<'s> {
    /// Takes charge of `handle`; `what` names it in the log if destruction fails.
    pub(crate) fn new(session: &'s Session, handle: ObjectHandle, what: &'static str) -> Self {
        Self {
            session,
            handle,
            what,
        }
    }

    /// The object.
    pub(crate) fn handle(&self) -> ObjectHandle {
        self.handle
    }
}

impl Drop for ObjectGuard<'_> {
    fn drop(&mut self) {
        if let Err(error) = self.session.destroy_object(self.handle) {
            // Nothing better to do: the object is a session object and dies with the session.
            tracing::error!(
                object = self.what,
                error = %describe(&error),
                "C_DestroyObject failed; the session object remains until its session closes"
            );
        }
    }
}

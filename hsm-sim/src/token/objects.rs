//! Objects: creation, destruction, attributes, search; token objects persisted (sealed when private).

use super::*;

impl Device {
    pub(super) fn visible(st: &TokenState, e: &ObjectEntry) -> bool {
        !e.private || st.login == LoginState::User
    }

    /// Writes a token object; returns the ciphertext of a private one.
    pub(super) fn persist(
        &self,
        st: &TokenState,
        file: &str,
        obj: &Object,
        private: bool,
    ) -> CkResult<Option<Sealed>> {
        let stored = if private {
            let key = st.token_key.as_ref().ok_or(Rv(CKR_USER_NOT_LOGGED_IN))?;
            let secret = match &obj.key {
                Some(k) => Some((
                    k.kind().to_string(),
                    hex::encode(k.secret_bytes()?.as_slice()),
                )),
                None => None,
            };
            let payload = ObjectPayload {
                attributes: encode_attributes(&obj.attrs),
                key: secret,
            };
            let json =
                Zeroizing::new(serde_json::to_vec(&payload).map_err(|_| Rv(CKR_GENERAL_ERROR))?);
            StoredObject::Sealed {
                sealed: seal(key, file.as_bytes(), &json)?,
            }
        } else {
            StoredObject::Public {
                attributes: encode_attributes(&obj.attrs),
            }
        };
        self.store.save_object(file, &stored)?;
        Ok(match stored {
            StoredObject::Sealed { sealed } => Some(sealed),
            StoredObject::Public { .. } => None,
        })
    }

    /// Adds an object (persisting a token object) and returns its handle.
    pub(super) fn insert_object(
        &self,
        st: &mut TokenState,
        session: CK_SESSION_HANDLE,
        obj: Object,
    ) -> CkResult<CK_OBJECT_HANDLE> {
        let token = obj.bool_attr(CKA_TOKEN, false);
        let private = obj.bool_attr(CKA_PRIVATE, false);
        let (file, sealed) = if token {
            let id = hex::encode(random_bytes::<12>()?);
            // The ciphertext is kept so that a logout can lock the object again.
            let sealed = self.persist(st, &id, &obj, private)?;
            (Some(id), sealed)
        } else {
            (None, None)
        };
        let h = self.handle();
        st.objects.insert(
            h,
            ObjectEntry {
                file,
                private,
                owner: (!token).then_some(session),
                sealed,
                open: Some(Arc::new(obj)),
            },
        );
        Ok(h)
    }

    pub(super) fn check_write_access(
        &self,
        st: &TokenState,
        session: &Session,
        token: bool,
        private: bool,
    ) -> CkResult<()> {
        if token && !session.rw {
            return Err(Rv(CKR_SESSION_READ_ONLY));
        }
        if private && st.login != LoginState::User {
            return Err(Rv(CKR_USER_NOT_LOGGED_IN));
        }
        Ok(())
    }

    /// C_CreateObject: public keys, certificates and data objects (private keys are only generated inside).
    pub fn create_object(
        &self,
        h: CK_SESSION_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> CkResult<CK_OBJECT_HANDLE> {
        self.enter(Some(OpKind::Objects))?;
        let s = self.session(h)?;
        let class = value_of(template, CKA_CLASS)
            .and_then(ulong_from)
            .ok_or(Rv(CKR_TEMPLATE_INCOMPLETE))?;
        if !matches!(class, CKO_PUBLIC_KEY | CKO_CERTIFICATE | CKO_DATA) {
            return Err(Rv(CKR_ATTRIBUTE_VALUE_INVALID));
        }
        if template
            .iter()
            .any(|(t, _)| SENSITIVE_ATTRIBUTES.contains(t) && class != CKO_DATA)
        {
            return Err(Rv(CKR_TEMPLATE_INCONSISTENT));
        }
        if class == CKO_PUBLIC_KEY {
            let key_type = value_of(template, CKA_KEY_TYPE)
                .and_then(ulong_from)
                .ok_or(Rv(CKR_TEMPLATE_INCOMPLETE))?;
            let needed: &[CK_ATTRIBUTE_TYPE] = match key_type {
                CKK_EC | CKK_EC_EDWARDS => &[CKA_EC_PARAMS, CKA_EC_POINT],
                CKK_RSA => &[CKA_MODULUS, CKA_PUBLIC_EXPONENT],
                _ => return Err(Rv(CKR_ATTRIBUTE_VALUE_INVALID)),
            };
            if needed.iter().any(|t| value_of(template, *t).is_none()) {
                return Err(Rv(CKR_TEMPLATE_INCOMPLETE));
            }
        }
        let token = bool_of(template, CKA_TOKEN).unwrap_or(false);
        let private = bool_of(template, CKA_PRIVATE).unwrap_or(false);
        let mut attrs: Attributes = template.iter().cloned().collect();
        attrs.insert(CKA_TOKEN, b(token));
        attrs.insert(CKA_PRIVATE, b(private));
        attrs.entry(CKA_MODIFIABLE).or_insert_with(|| b(true));
        attrs.entry(CKA_LABEL).or_default();
        if class != CKO_DATA {
            attrs.entry(CKA_ID).or_default();
        }
        let session = lock(&s);
        let mut st = self.write();
        self.check_write_access(&st, &session, token, private)?;
        self.insert_object(&mut st, h, Object { attrs, key: None })
    }

    /// C_DestroyObject.
    pub fn destroy_object(&self, h: CK_SESSION_HANDLE, obj: CK_OBJECT_HANDLE) -> CkResult<()> {
        self.enter(Some(OpKind::Objects))?;
        let s = self.session(h)?;
        let session = lock(&s);
        let mut st = self.write();
        let e = st
            .objects
            .get(&obj)
            .filter(|e| Self::visible(&st, e))
            .ok_or(Rv(CKR_OBJECT_HANDLE_INVALID))?;
        if e.file.is_some() && !session.rw {
            return Err(Rv(CKR_SESSION_READ_ONLY));
        }
        if let Some(file) = e.file.clone() {
            self.store.delete_object(&file)?;
        }
        st.objects.remove(&obj);
        Ok(())
    }

    pub(super) fn object(&self, st: &TokenState, obj: CK_OBJECT_HANDLE) -> CkResult<Arc<Object>> {
        st.objects
            .get(&obj)
            .filter(|e| Self::visible(st, e))
            .and_then(|e| e.open.clone())
            .ok_or(Rv(CKR_OBJECT_HANDLE_INVALID))
    }

    /// C_GetAttributeValue: one answer per requested type.
    pub fn get_attributes(
        &self,
        h: CK_SESSION_HANDLE,
        obj: CK_OBJECT_HANDLE,
        types: &[CK_ATTRIBUTE_TYPE],
    ) -> CkResult<Vec<AttrValue>> {
        self.enter(Some(OpKind::Objects))?;
        self.session(h)?;
        let o = self.object(&self.read(), obj)?;
        let is_private_key = o.key.is_some();
        Ok(types
            .iter()
            .map(|t| {
                if is_private_key && SENSITIVE_ATTRIBUTES.contains(t) {
                    AttrValue::Sensitive
                } else {
                    o.attrs
                        .get(t)
                        .map(|v| AttrValue::Value(v.clone()))
                        .unwrap_or(AttrValue::Invalid)
                }
            })
            .collect())
    }

    /// C_SetAttributeValue: the label, the id and a few other descriptive attributes.
    pub fn set_attributes(
        &self,
        h: CK_SESSION_HANDLE,
        obj: CK_OBJECT_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> CkResult<()> {
        self.enter(Some(OpKind::Objects))?;
        let s = self.session(h)?;
        let session = lock(&s);
        let mut st = self.write();
        let current = self.object(&st, obj)?;
        if !current.bool_attr(CKA_MODIFIABLE, true) {
            return Err(Rv(CKR_ATTRIBUTE_READ_ONLY));
        }
        if template
            .iter()
            .any(|(t, _)| !MODIFIABLE_ATTRIBUTES.contains(t))
        {
            return Err(Rv(CKR_ATTRIBUTE_READ_ONLY));
        }
        let (file, private) = match st.objects.get(&obj) {
            Some(e) => (e.file.clone(), e.private),
            None => return Err(Rv(CKR_OBJECT_HANDLE_INVALID)),
        };
        self.check_write_access(&st, &session, file.is_some(), private)?;
        let mut updated = (*current).clone();
        for (t, v) in template {
            updated.attrs.insert(*t, v.clone());
        }
        let sealed = match &file {
            Some(file) => self.persist(&st, file, &updated, private)?,
            None => None,
        };
        if let Some(e) = st.objects.get_mut(&obj) {
            e.open = Some(Arc::new(updated));
            if sealed.is_some() {
                e.sealed = sealed;
            }
        }
        Ok(())
    }

    /// C_FindObjectsInit.
    pub fn find_init(
        &self,
        h: CK_SESSION_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> CkResult<()> {
        self.enter(Some(OpKind::Objects))?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        if session.find.is_some() {
            return Err(Rv(CKR_OPERATION_ACTIVE));
        }
        let st = self.read();
        let found = st
            .objects
            .iter()
            .filter(|(_, e)| Self::visible(&st, e))
            .filter_map(|(h, e)| e.open.as_ref().map(|o| (h, o)))
            .filter(|(_, o)| template.iter().all(|(t, v)| o.attrs.get(t) == Some(v)))
            .map(|(h, _)| *h)
            .collect();
        session.find = Some((found, 0));
        Ok(())
    }

    /// C_FindObjects: up to `max` more handles.
    pub fn find_next(&self, h: CK_SESSION_HANDLE, max: usize) -> CkResult<Vec<CK_OBJECT_HANDLE>> {
        self.enter(None)?;
        let s = self.session(h)?;
        let mut session = lock(&s);
        let (found, pos) = session
            .find
            .as_mut()
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))?;
        let end = pos.saturating_add(max).min(found.len());
        let out = found[*pos..end].to_vec();
        *pos = end;
        Ok(out)
    }

    /// C_FindObjectsFinal.
    pub fn find_final(&self, h: CK_SESSION_HANDLE) -> CkResult<()> {
        self.enter(None)?;
        let s = self.session(h)?;
        lock(&s)
            .find
            .take()
            .map(|_| ())
            .ok_or(Rv(CKR_OPERATION_NOT_INITIALIZED))
    }
}

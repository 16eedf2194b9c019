//! Key-pair generation.

use super::*;

impl Device {
    /// C_GenerateKeyPair: returns (public key handle, private key handle).
    pub fn generate_key_pair(
        &self,
        h: CK_SESSION_HANDLE,
        mechanism: CK_MECHANISM_TYPE,
        public: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
        private: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> CkResult<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE)> {
        self.enter(None)?;
        let s = self.session(h)?;
        let (spec, ec_params, key_type) = match mechanism {
            CKM_EC_KEY_PAIR_GEN | CKM_EC_EDWARDS_KEY_PAIR_GEN => {
                let params =
                    value_of(public, CKA_EC_PARAMS).or_else(|| value_of(private, CKA_EC_PARAMS));
                let curve = match (params, mechanism) {
                    (Some(p), _) => Curve::from_ec_params(p)?,
                    (None, CKM_EC_EDWARDS_KEY_PAIR_GEN) => Curve::Ed25519,
                    (None, _) => return Err(Rv(CKR_TEMPLATE_INCOMPLETE)),
                };
                let edwards = curve == Curve::Ed25519;
                if edwards != (mechanism == CKM_EC_EDWARDS_KEY_PAIR_GEN) {
                    return Err(Rv(CKR_TEMPLATE_INCONSISTENT));
                }
                let params = params
                    .map(<[u8]>::to_vec)
                    .unwrap_or_else(|| curve.default_ec_params());
                (
                    KeySpec::Ec(curve),
                    Some(params),
                    if edwards { CKK_EC_EDWARDS } else { CKK_EC },
                )
            }
            CKM_RSA_PKCS_KEY_PAIR_GEN => {
                let bits = value_of(public, CKA_MODULUS_BITS)
                    .and_then(ulong_from)
                    .ok_or(Rv(CKR_TEMPLATE_INCOMPLETE))?;
                let exponent = value_of(public, CKA_PUBLIC_EXPONENT)
                    .map(<[u8]>::to_vec)
                    .unwrap_or(vec![1, 0, 1]);
                (
                    KeySpec::Rsa {
                        bits: bits as usize,
                        exponent,
                    },
                    None,
                    CKK_RSA,
                )
            }
            _ => return Err(Rv(CKR_MECHANISM_INVALID)),
        };
        for (tpl, class) in [(public, CKO_PUBLIC_KEY), (private, CKO_PRIVATE_KEY)] {
            if value_of(tpl, CKA_CLASS)
                .and_then(ulong_from)
                .is_some_and(|c| c != class)
                || value_of(tpl, CKA_KEY_TYPE)
                    .and_then(ulong_from)
                    .is_some_and(|k| k != key_type)
            {
                return Err(Rv(CKR_TEMPLATE_INCONSISTENT));
            }
            if tpl.iter().any(|(t, _)| SENSITIVE_ATTRIBUTES.contains(t)) {
                return Err(Rv(CKR_TEMPLATE_INCONSISTENT));
            }
        }
        let pub_token = bool_of(public, CKA_TOKEN).unwrap_or(false);
        let pub_private = bool_of(public, CKA_PRIVATE).unwrap_or(false);
        let priv_token = bool_of(private, CKA_TOKEN).unwrap_or(false);
        {
            let session = lock(&s);
            let st = self.read();
            self.check_write_access(&st, &session, pub_token, pub_private)?;
            self.check_write_access(&st, &session, priv_token, true)?;
        }
        self.round_trip(OpKind::Keygen)?;
        let key = Arc::new(KeyMaterial::generate(&spec)?);

        let mut pub_attrs: Attributes = public.iter().cloned().collect();
        let mut priv_attrs: Attributes = private.iter().cloned().collect();
        for (attrs, class) in [
            (&mut pub_attrs, CKO_PUBLIC_KEY),
            (&mut priv_attrs, CKO_PRIVATE_KEY),
        ] {
            attrs.insert(CKA_CLASS, ulong_bytes(class));
            attrs.insert(CKA_KEY_TYPE, ulong_bytes(key_type));
            attrs.insert(CKA_LOCAL, b(true));
            attrs.insert(CKA_KEY_GEN_MECHANISM, ulong_bytes(mechanism));
            attrs.entry(CKA_LABEL).or_default();
            attrs.entry(CKA_ID).or_default();
            attrs.entry(CKA_MODIFIABLE).or_insert_with(|| b(true));
            // The token offers no key derivation, whatever the template asked for.
            attrs.insert(CKA_DERIVE, b(false));
            if let Some(p) = &ec_params {
                attrs.insert(CKA_EC_PARAMS, p.clone());
            }
        }
        pub_attrs.insert(CKA_TOKEN, b(pub_token));
        pub_attrs.insert(CKA_PRIVATE, b(pub_private));
        pub_attrs.entry(CKA_VERIFY).or_insert_with(|| b(true));
        pub_attrs.entry(CKA_ENCRYPT).or_insert_with(|| b(false));
        pub_attrs.entry(CKA_WRAP).or_insert_with(|| b(false));
        pub_attrs.entry(CKA_TRUSTED).or_insert_with(|| b(false));
        for (t, v) in key.public_attributes(true)? {
            pub_attrs.insert(t, v);
        }
        priv_attrs.insert(CKA_TOKEN, b(priv_token));
        // Private keys are private objects and never leave the token.
        priv_attrs.insert(CKA_PRIVATE, b(true));
        priv_attrs.insert(CKA_SENSITIVE, b(true));
        priv_attrs.insert(CKA_ALWAYS_SENSITIVE, b(true));
        priv_attrs.insert(CKA_EXTRACTABLE, b(false));
        priv_attrs.insert(CKA_NEVER_EXTRACTABLE, b(true));
        priv_attrs.entry(CKA_SIGN).or_insert_with(|| b(true));
        priv_attrs.entry(CKA_DECRYPT).or_insert_with(|| b(false));
        priv_attrs.entry(CKA_UNWRAP).or_insert_with(|| b(false));
        priv_attrs
            .entry(CKA_SIGN_RECOVER)
            .or_insert_with(|| b(false));
        priv_attrs
            .entry(CKA_ALWAYS_AUTHENTICATE)
            .or_insert_with(|| b(false));
        for (t, v) in key.public_attributes(false)? {
            priv_attrs.insert(t, v);
        }

        let _session = lock(&s);
        let mut st = self.write();
        // The login may have ended while the key was being generated.
        if st.login != LoginState::User {
            return Err(Rv(CKR_USER_NOT_LOGGED_IN));
        }
        let pub_h = self.insert_object(
            &mut st,
            h,
            Object {
                attrs: pub_attrs,
                key: None,
            },
        )?;
        let priv_h = match self.insert_object(
            &mut st,
            h,
            Object {
                attrs: priv_attrs,
                key: Some(key),
            },
        ) {
            Ok(p) => p,
            Err(e) => {
                if let Some(f) = st.objects.remove(&pub_h).and_then(|e| e.file) {
                    let _ = self.store.delete_object(&f);
                }
                return Err(e);
            }
        };
        Ok((pub_h, priv_h))
    }
}

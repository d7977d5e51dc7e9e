package etcdtest

// WithoutV2 serves only the v3 API, as etcd 3.6 and later do (and 3.4/3.5
// without --enable-v2): v2 requests are answered 404.
func WithoutV2() Option { return func(o *options) { o.noV2 = true } }
